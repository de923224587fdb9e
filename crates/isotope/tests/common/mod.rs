//! Helpers shared by the end-to-end tests that run the real `isotope` binary: paths,
//! a clean command (no ISOTOPE_* from the caller's environment), and a server started
//! on a free port and killed on drop.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model() -> PathBuf {
    workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The binary with none of the caller's `ISOTOPE_*` settings, so a developer's
/// environment cannot change what a test runs — except `ISOTOPE_DATA`, pointed at this
/// checkout's `data/`: the binary's built-in default is the directory it was compiled
/// in, and a shared target directory may hold a binary compiled from another checkout.
pub fn isotope() -> StdCommand {
    let mut c = StdCommand::cargo_bin("isotope").unwrap();
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("ISOTOPE_") {
            c.env_remove(var);
        }
    }
    c.env("ISOTOPE_DATA", workspace().join("data"));
    c
}

pub fn run_ok(cmd: &mut StdCommand) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "command failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `isotope serve`, killed on drop; its stderr so far is in `log`.
pub struct Server {
    pub child: Child,
    /// The address it announced (empty for [`spawn`] until [`Server::wait_ready`]).
    pub addr: String,
    pub log: Arc<Mutex<String>>,
    announced: Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Wait (up to 180 s) until the server says where it listens; panics with its log
    /// if it exits first.
    pub fn wait_ready(&mut self) {
        match self.announced.recv_timeout(Duration::from_secs(180)) {
            Ok(addr) => self.addr = addr,
            Err(RecvTimeoutError::Disconnected) => panic!(
                "server exited before it was ready:\n{}",
                self.log.lock().unwrap()
            ),
            Err(RecvTimeoutError::Timeout) => panic!("server not ready within 180 s"),
        }
    }
}

/// Spawn `cmd` (an `isotope serve …` command line) without waiting for it: its stderr
/// is collected into [`Server::log`], and a line with "panicked" fails the test.
pub fn spawn(cmd: &mut StdCommand) -> Server {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, announced) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(String::new()));
    let l = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = l.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
            if !sent {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap().to_owned());
                    sent = true;
                }
            }
            assert!(!line.contains("panicked"), "server panicked: {l}");
        }
    });
    Server {
        child,
        addr: String::new(),
        log,
        announced,
    }
}

/// Spawn `cmd` and wait until it says where it listens.
pub fn start_cmd(cmd: &mut StdCommand) -> Server {
    let mut server = spawn(cmd);
    server.wait_ready();
    server
}

/// `isotope serve --model M --slots 4 --ctx 1024`, to add flags to.
pub fn serve_cmd() -> StdCommand {
    let mut c = isotope();
    c.arg("serve")
        .arg("--model")
        .arg(model())
        .args(["--slots", "4", "--ctx", "1024"]);
    c
}

/// Start `isotope serve --model M --addr 127.0.0.1:0 --slots 4 --ctx 1024 ARGS…` and wait
/// until it says where it listens.
pub fn start(args: &[&str]) -> Server {
    start_cmd(serve_cmd().args(["--addr", "127.0.0.1:0"]).args(args))
}
