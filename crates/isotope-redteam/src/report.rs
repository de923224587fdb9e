//! `report.json` (everything measured) and `report.html` (the same, readable, with
//! inline SVG plots). Pure: data in, files out.

use std::fmt::Write;
use std::path::Path;

use isotope_audit::AuditResult;
use serde::{Deserialize, Serialize};

use crate::svg::{Chart, Series};
use crate::{io_err, Arm, AuditPoint, HarvestSummary, RedteamConfig, Result};

/// The run's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub tool_version: String,
    pub config: RedteamConfig,
    /// Scheme of the watermarked teacher (canonical spec).
    pub scheme: String,
    /// Its window length h.
    pub window: usize,
    pub key_id: String,
    /// Commitment to the run's key (the key itself is `OUT/watermark.key`).
    pub key_commitment: String,
    /// Watermarked arm first, control second.
    pub arms: Vec<ArmReport>,
    /// Students trained on mixtures of the two arms' answers (`config.mixes`).
    #[serde(default)]
    pub mixes: Vec<MixReport>,
    pub sentinel: SentinelReport,
    pub cost: Cost,
    /// Wall time of this invocation (a resumed run counts only its own part).
    pub wall_secs: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmReport {
    pub arm: Arm,
    pub harvest: HarvestSummary,
    pub student: ArmStudent,
}

/// A student trained on a mixture: `watermarked_examples` of `examples` harvest
/// answers come from the watermarked teacher, the rest from the control teacher.
///
/// The mixture stands for a harvester that bought `watermarked_examples` answers
/// from us and trained on them among other data (the control teacher's answers), so
/// its student's supervised reading reads exactly those answers — what we served it
/// (Sander et al.'s supervised setting). `diluted_reading` reads every answer the
/// watermarked arm served instead: a harvester that trained on only this share of
/// what it bought, and an auditor who cannot tell which share.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MixReport {
    /// Share of prompts answered by the watermarked teacher, as configured.
    pub fraction: f64,
    /// Its directory under the output directory (`mix-25`).
    pub name: String,
    pub examples: usize,
    pub watermarked_examples: usize,
    pub student: ArmStudent,
    /// Supervised reading of every answer the watermarked arm served (the arms'
    /// supervised set), of which this student trained on `watermarked_examples`.
    #[serde(default)]
    pub diluted_reading: Option<AuditResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmStudent {
    pub params: usize,
    pub examples: usize,
    pub steps: usize,
    pub first_loss: f64,
    pub final_loss: f64,
    pub tokens_per_sec: f64,
    /// Response tokens in the training data.
    pub response_tokens: u64,
    /// (step, loss)
    pub loss_curve: Vec<(usize, f64)>,
    /// Reading-mode audits after each training stage.
    pub points: Vec<AuditPoint>,
    /// Final white-box reading-mode audit (unsupervised and supervised).
    pub reading: AuditResult,
    /// Final black-box audit on held-out prompts.
    pub black_box: AuditResult,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SentinelReport {
    pub enabled: bool,
    /// Time of the first usage event (minutes are counted from here).
    pub start_ms: i64,
    pub alerts: Vec<AlertRow>,
    pub accounts: Vec<AccountTimeline>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AlertRow {
    pub minutes: f64,
    pub account: String,
    pub level: String,
    pub score: f64,
    pub reasons: serde_json::Value,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccountTimeline {
    pub account: String,
    pub requests: u64,
    /// Requests answered with an HTTP error that still left a usage event.
    pub refused: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Level the server applied to the last request.
    pub final_level: String,
    /// When a request was first served under a level above `observe`.
    pub first_restricted_minutes: Option<f64>,
    pub points: Vec<TimelinePoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelinePoint {
    pub minutes: f64,
    /// Cumulative completion tokens of the account.
    pub completion_tokens: u64,
    /// Level applied to this request.
    pub level: String,
}

/// What the harvest cost the attacker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cost {
    pub price_per_million_tokens: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// (prompt + completion) × price / 1e6.
    pub total: f64,
}

impl Cost {
    pub fn new(price: f64, prompt_tokens: u64, completion_tokens: u64) -> Cost {
        Cost {
            price_per_million_tokens: price,
            prompt_tokens,
            completion_tokens,
            total: (prompt_tokens + completion_tokens) as f64 * price / 1e6,
        }
    }
}

/// Writes `report.json` and `report.html` into `dir`.
pub fn write(dir: &Path, r: &Report) -> Result<()> {
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(r).expect("serialises"))
        .map_err(io_err(&json))?;
    let html = dir.join("report.html");
    std::fs::write(&html, render_html(r)).map_err(io_err(&html))?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nlog10(p: f64) -> f64 {
    -p.max(1e-300).log10()
}

fn p_fmt(p: f64) -> String {
    format!("{p:.3e}")
}

fn level_color(level: &str) -> &'static str {
    match level {
        "flag" => "#d4a017",
        "throttle" => "#e67e22",
        "degrade" => "#c0392b",
        "block" => "#6c0a0a",
        _ => "#2c7",
    }
}

/// Which texts a reading-mode point's p-value came from.
#[derive(Clone, Copy)]
enum Reading {
    /// The student read the harvest (drawn solid).
    Supervised,
    /// The student read new teacher outputs (drawn dashed).
    Unsupervised,
}

/// A student's reading-mode p-values (one variant) against tokens trained on.
fn reading_curve(name: &str, color: &'static str, s: &ArmStudent, variant: Reading) -> Series {
    let (label, pick): (_, fn(&AuditPoint) -> Option<f64>) = match variant {
        Reading::Supervised => ("supervised", |p| p.supervised_p),
        Reading::Unsupervised => ("unsupervised", |p| p.unsupervised_p),
    };
    Series {
        name: format!("{name} – reading, {label}"),
        color,
        points: s
            .points
            .iter()
            .filter_map(|p| pick(p).map(|v| (p.harvest_tokens_trained as f64, nlog10(v))))
            .collect(),
        dashed: matches!(variant, Reading::Unsupervised),
        dots: true,
    }
}

/// −log10 p against harvested tokens trained on, with the p = 1e-3 line.
fn p_chart(title: &str, series: Vec<Series>) -> String {
    Chart {
        title,
        x_label: "harvested completion tokens processed in training (passes counted)",
        y_label: "−log10 p",
        series,
        vlines: vec![],
        hline: Some((3.0, "p = 1e-3".into())),
    }
    .render()
}

/// The HTML page.
pub fn render_html(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>isotope red-team report</title>\
         <style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}.note{{background:#fff8e0;padding:8px 12px;border-left:4px solid #e0b000}}</style>\
         </head><body><h1>isotope red-team report</h1>"
    );
    let wm = r.arms.iter().find(|a| a.arm == Arm::Watermarked);
    let control = r.arms.iter().find(|a| a.arm == Arm::Control);
    let _ = write!(
        h,
        "<p>isotope {} · teacher <code>{}</code> · scheme <code>{}</code> · key <code>{}</code> \
         (commitment <code>{}</code>) · student <code>{}</code>, {} epoch(s) · wall time {:.1} min</p>",
        esc(&r.tool_version),
        esc(&r.config.model.display().to_string()),
        esc(&r.scheme),
        esc(&r.key_id),
        esc(&r.key_commitment[..r.key_commitment.len().min(16)]),
        esc(&r.config.student),
        r.config.epochs,
        r.wall_secs / 60.0
    );
    let _ = write!(
        h,
        "<p class=\"note\">The watermark window here is h = {}. A short window (h ≤ 2) is what a \
         student trained from scratch on ~100k tokens can absorb: each (window, token) pair \
         recurs many times in the harvest. The server's production default is h = 4, which \
         a small student would see too rarely per window to learn. p-values below are exact \
         under \"the student does not depend on the key\"; nothing here is tuned to the \
         outcome.</p>",
        r.window
    );
    if let Some(w) = r.arms.iter().find(|a| a.arm == Arm::Watermarked) {
        if w.harvest.time_limited {
            let _ = write!(
                h,
                "<p class=\"note\">The harvest was cut at its time limit ({} min per arm, \
                 <code>--harvest-minutes</code>): {} of {} prompts, {} completion tokens. The \
                 control arm answered the same prompts. More tokens give a stronger audit: \
                 raise the limit (0: none) or rerun on a faster machine.</p>",
                r.config.harvest_minutes,
                w.harvest.records,
                r.config.prompts,
                w.harvest.completion_tokens
            );
        }
    }

    // Headline table.
    h.push_str("<h2>Audits</h2><table><tr><th>student</th><th>trained on</th><th>harvest tokens</th>\
        <th>reading, unsupervised p</th><th>reading, supervised p</th><th>reading p (corrected)</th>\
        <th>black-box p (held-out prompts)</th><th>black-box tuples</th>\
        <th>supervised p, every served answer (diluted)</th></tr>");
    let mut rows: Vec<(String, String, u64, &ArmStudent, Option<&AuditResult>)> = Vec::new();
    for a in &r.arms {
        let what = if a.arm == Arm::Watermarked {
            "watermarked teacher output (100%)"
        } else {
            "same teacher, watermark off (0%)"
        };
        rows.push((
            a.arm.name().into(),
            what.into(),
            a.harvest.completion_tokens,
            &a.student,
            None,
        ));
    }
    for m in &r.mixes {
        rows.push((
            m.name.clone(),
            format!(
                "{:.1}% watermarked ({} of {} answers)",
                100.0 * m.watermarked_examples as f64 / m.examples.max(1) as f64,
                m.watermarked_examples,
                m.examples
            ),
            m.student.response_tokens,
            &m.student,
            m.diluted_reading.as_ref(),
        ));
    }
    for (name, what, tokens, s, diluted) in &rows {
        let v = |n: &str| {
            s.reading
                .variants
                .iter()
                .find(|v| v.name == n)
                .map(|v| p_fmt(v.p_value))
                .unwrap_or_else(|| "–".into())
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><b>{}</b></td><td><b>{}</b></td><td>{}</td><td>{}</td></tr>",
            esc(name),
            esc(what),
            tokens,
            v("unsupervised"),
            v("supervised"),
            p_fmt(s.reading.p_value),
            p_fmt(s.black_box.p_value),
            s.black_box.scored_tokens,
            diluted.map_or_else(|| "–".into(), |d| p_fmt(d.p_value))
        );
    }
    h.push_str("</table>");
    let mass = rows.iter().any(|(_, _, _, s, _)| {
        s.reading.reading_statistic == Some(isotope_audit::ReadingStatistic::Mass)
    });
    let what = if mass {
        "the student's probability on green candidates at each position of a text it reads \
         (each candidate it gives at least 1/128 counts with weight round(64 q)), green \
         taken from the watermark window of that text, each distinct window counted once \
         (an exact weighted-binomial null)"
    } else {
        "the student's top-1 prediction at each position of a text it reads, scored \
         against the watermark window of that text, one tuple per distinct window"
    };
    let _ = write!(
        h,
        "<p class=\"note\">Reading mode: {what}. <i>Supervised</i>: it reads the answers we served to its harvester \
         (an arm's harvest; for a mixture, the watermarked answers in its training set: a \
         harvester that bought those and diluted them with other data). <i>Diluted</i> \
         (mixtures): it reads every answer the watermarked arm served instead, as if the \
         harvester had trained on only that share of what it bought and the auditor could \
         not tell which. <i>Unsupervised</i>: it reads new answers of the watermarked teacher \
         to the held-out prompts, which no student trained on — the test when the training \
         data is not known. <i>Corrected</i>: the smaller p of the two, × 2. \
         <i>Black-box</i>: the student answers {} held-out prompts (up to {} tokens each, \
         sampled at temperature {}), scored one tuple per distinct (window, token) with the \
         prompts' windows excluded.</p>",
        r.config.heldout_prompts,
        r.config.heldout_max_tokens,
        r.config.audit_temperature
    );

    // p-value vs tokens.
    let mut series = Vec::new();
    for (a, color) in [(wm, "#c0392b"), (control, "#2471a3")] {
        let Some(a) = a else { continue };
        for variant in [Reading::Supervised, Reading::Unsupervised] {
            series.push(reading_curve(a.arm.name(), color, &a.student, variant));
        }
    }
    h.push_str("<h2>p-value vs harvest tokens trained on</h2>");
    h.push_str(&p_chart(
        "Reading-mode audit after each training stage",
        series,
    ));
    if !r.mixes.is_empty() {
        let palette = ["#e67e22", "#8e44ad", "#16a085", "#7f8c8d"];
        let series = r
            .mixes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                reading_curve(
                    &m.name,
                    palette[i % palette.len()],
                    &m.student,
                    Reading::Supervised,
                )
            })
            .collect();
        h.push_str(&p_chart(
            "Mixtures: reading-mode audit after each training stage",
            series,
        ));
    }

    // Loss curves.
    let mut series = Vec::new();
    for (a, color) in [(wm, "#c0392b"), (control, "#2471a3")] {
        let Some(a) = a else { continue };
        let pts: Vec<(f64, f64)> = a
            .student
            .loss_curve
            .iter()
            .map(|&(s, l)| (s as f64, l))
            .collect();
        let w = (pts.len() / 25).max(1);
        let smooth: Vec<(f64, f64)> = pts
            .windows(w)
            .map(|win| {
                (
                    win[win.len() - 1].0,
                    win.iter().map(|p| p.1).sum::<f64>() / w as f64,
                )
            })
            .collect();
        series.push(Series {
            name: format!("{} student", a.arm.name()),
            color,
            points: smooth,
            dashed: a.arm == Arm::Control,
            dots: false,
        });
    }
    h.push_str("<h2>Training loss</h2>");
    h.push_str(
        &Chart {
            title: "Training loss (moving average)",
            x_label: "step",
            y_label: "cross-entropy (nats/token)",
            series,
            vlines: vec![],
            hline: None,
        }
        .render(),
    );
    h.push_str("<table><tr><th>student</th><th>parameters</th><th>examples</th><th>steps</th><th>first loss</th><th>final loss</th><th>tokens/s</th></tr>");
    let students = r
        .arms
        .iter()
        .map(|a| (a.arm.name(), &a.student))
        .chain(r.mixes.iter().map(|m| (m.name.as_str(), &m.student)));
    for (name, s) in students {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.0}</td></tr>",
            esc(name),
            s.params,
            s.examples,
            s.steps,
            s.first_loss,
            s.final_loss,
            s.tokens_per_sec
        );
    }
    h.push_str("</table>");

    // Sentinel.
    h.push_str("<h2>Sentinel</h2>");
    if !r.sentinel.enabled {
        h.push_str("<p>The sentinel was off for this run.</p>");
    }
    let palette = ["#2471a3", "#27ae60", "#8e44ad", "#16a085"];
    let mut series = Vec::new();
    let mut benign_i = 0;
    for acc in &r.sentinel.accounts {
        let harvester = acc.account.starts_with("harvester");
        let color = if harvester {
            "#c0392b"
        } else {
            benign_i += 1;
            palette[(benign_i - 1) % palette.len()]
        };
        series.push(Series {
            name: acc.account.clone(),
            color,
            points: acc
                .points
                .iter()
                .map(|p| (p.minutes, p.completion_tokens as f64))
                .collect(),
            dashed: !harvester,
            dots: false,
        });
    }
    let vlines = r
        .sentinel
        .alerts
        .iter()
        .map(|a| {
            (
                a.minutes,
                format!("{}: {}", a.account, a.level),
                level_color(&a.level),
            )
        })
        .collect();
    h.push_str(
        &Chart {
            title: "Tokens served per account, and the sentinel's alerts",
            x_label: "minutes since the first request",
            y_label: "completion tokens (cumulative)",
            series,
            vlines,
            hline: None,
        }
        .render(),
    );
    h.push_str("<table><tr><th>account</th><th>requests</th><th>refused</th><th>completion tokens</th><th>first restricted (min)</th><th>last level applied</th></tr>");
    for a in &r.sentinel.accounts {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.account),
            a.requests,
            a.refused,
            a.completion_tokens,
            a.first_restricted_minutes
                .map(|m| format!("{m:.2}"))
                .unwrap_or_else(|| "never".into()),
            esc(&a.final_level)
        );
    }
    h.push_str("</table>");
    if r.sentinel.alerts.is_empty() {
        h.push_str("<p>No alerts.</p>");
    } else {
        h.push_str("<table><tr><th>minute</th><th>account</th><th>level</th><th>score</th><th>reasons</th></tr>");
        for a in &r.sentinel.alerts {
            let _ = write!(
                h,
                "<tr><td>{:.2}</td><td>{}</td><td>{}</td><td>{:.3}</td><td style=\"text-align:left\"><code>{}</code></td></tr>",
                a.minutes,
                esc(&a.account),
                esc(&a.level),
                a.score,
                esc(&a.reasons.to_string().chars().take(300).collect::<String>())
            );
        }
        h.push_str("</table>");
    }
    if let Some(w) = wm {
        let _ = write!(
            h,
            "<p>Harvester accounts used: {} · rate-limited responses: {} · retries: {}</p>",
            esc(&w.harvest.accounts.join(", ")),
            w.harvest.rate_limited,
            w.harvest.retries
        );
        if !w.harvest.stops.is_empty() {
            h.push_str("<ul>");
            for s in &w.harvest.stops {
                let _ = write!(h, "<li>{}</li>", esc(s));
            }
            h.push_str("</ul>");
        }
    }

    // Cost.
    let c = &r.cost;
    let _ = write!(
        h,
        "<h2>Cost of the harvest</h2><p>The harvester accounts were billed for {} prompt + {} \
         completion tokens = {} tokens; at {} per million tokens that is <b>{:.4}</b>.</p>",
        c.prompt_tokens,
        c.completion_tokens,
        c.prompt_tokens + c.completion_tokens,
        c.price_per_million_tokens,
        c.total
    );
    h.push_str("<h2>Files</h2><ul><li><code>report.json</code>: every number above</li>\
        <li><code>watermarked/</code>, <code>control/</code> (and <code>mix-*/</code>): harvests (<code>harvest.jsonl</code>), \
        students (<code>student/</code>, with <code>train_log.jsonl</code> and <code>loss.png</code>), \
        held-out answers, the teachers' SQLite stores</li></ul></body></html>");
    h
}
