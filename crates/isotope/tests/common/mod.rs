//! Helpers shared by the end-to-end tests that run the real `isotope` binary: paths,
//! a clean command (no ISOTOPE_* from the caller's environment), and a server started
//! on a free port and killed on drop.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model() -> PathBuf {
    workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The binary with none of the caller's `ISOTOPE_*` settings, so a developer's
/// environment cannot change what a test runs.
pub fn isotope() -> StdCommand {
    let mut c = StdCommand::cargo_bin("isotope").unwrap();
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("ISOTOPE_") {
            c.env_remove(var);
        }
    }
    c
}

pub fn run_ok(cmd: &mut StdCommand) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "command failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `isotope serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `isotope serve --model M --addr 127.0.0.1:0 --slots 4 --ctx 1024 ARGS…` and wait
/// until it says where it listens.
pub fn start(args: &[&str]) -> Server {
    let mut child = isotope()
        .arg("serve")
        .arg("--model")
        .arg(model())
        .args(["--addr", "127.0.0.1:0", "--slots", "4", "--ctx", "1024"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        let mut sent = false;
        let mut log = String::new();
        while let Some(Ok(line)) = lines.next() {
            log.push_str(&line);
            log.push('\n');
            if !sent {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_owned();
                    let _ = tx.send(Ok(addr));
                    sent = true;
                }
            }
            assert!(!line.contains("panicked"), "server panicked: {log}");
        }
        if !sent {
            let _ = tx.send(Err(log));
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(Ok(addr)) => addr,
        Ok(Err(log)) => panic!("server exited before it was ready:\n{log}"),
        Err(_) => panic!("server not ready within 180 s"),
    };
    Server { child, addr }
}
