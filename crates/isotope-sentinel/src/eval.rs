//! Training, evaluation, leave-one-strategy-out and the throughput benchmark.
//!
//! Honesty rules this module keeps: the model is fitted on one seed of the *tuning*
//! prompt split (population ×2), its flag threshold calibrated on a second tuning seed
//! (population ×3, about 3,200 benign accounts), and it is evaluated on other seeds of
//! the *evaluation* split (the default scenario). The recipe's knobs
//! ([`TrainConfig::default`]) were chosen on a third tuning-split seed (29011), never
//! on evaluation seeds. Weights on [`crate::features::MONOTONE`] features are
//! constrained to be ≥ 0.
//! Traffic is replayed once through a recording [`Sentinel`]; the recorded feature
//! snapshots are then scored by each model, which is exactly what the online sentinel
//! would have computed at those moments (features do not depend on the weights).
//! An account counts as flagged if it reached `flag` at *any* re-score — the online
//! false-positive rate, not the end-of-run one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use isotope_store::UsageEvent;
use serde::{Deserialize, Serialize};

use crate::embed::{quantize, Embedder};
use crate::features::monotone_mask;
use crate::features::{Features, Reference};
use crate::model::{fit_additive, logit, sigmoid, BoostParams, Level, Model, Thresholds};
use crate::sentinel::{Sentinel, SentinelConfig, Snapshot};
use crate::sim::{simulate, Scenario, SimError, Simulated};
use crate::stats::{auc, clopper_pearson_upper, median};

/// How the default model is trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Scenario (normally on the tuning prompt split).
    pub scenario: Scenario,
    /// Seed of the simulation the weights are fitted on.
    pub fit_seed: u64,
    /// Population multiplier of the fitting simulation (more harvesting accounts per
    /// strategy to learn from).
    #[serde(default = "one")]
    pub fit_scale: f64,
    /// Population multiplier of the calibration simulation (more benign accounts: a
    /// steadier estimate of the threshold's tail).
    #[serde(default = "one")]
    pub calib_scale: f64,
    /// Seed of the simulation the flag threshold is calibrated on.
    pub calib_seed: u64,
    /// Benign share allowed to reach `flag` in calibration: well below the 0.3% goal,
    /// so that the goal holds for the Clopper–Pearson *upper bound* of an evaluation
    /// on a few thousand benign accounts (3 alarms in 3,200 already bound it at 0.27%),
    /// not only for the point estimate.
    pub target_fpr: f64,
    /// Logit added to the calibrated threshold, for the same reason.
    pub margin_logit: f64,
    /// Harvesting accounts' snapshots count as positives only from this many requests
    /// on: a harvester's first few requests look like anyone's, and teaching the model
    /// that they are harvesting only teaches it to flag every short burst.
    #[serde(default)]
    pub positive_from_requests: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            scenario: Scenario::training(),
            fit_seed: 0x7121,
            fit_scale: 2.0,
            calib_scale: 6.0,
            calib_seed: 0x7122,
            target_fpr: 0.0005,
            margin_logit: 0.5,
            positive_from_requests: 30,
        }
    }
}

fn one() -> f64 {
    1.0
}

impl TrainConfig {
    /// The fitting and the calibration simulations (deterministic: training runs
    /// them again, so a caller may run them first, e.g. to embed their prompts with a
    /// progress bar).
    pub fn simulations(&self) -> Result<(Simulated, Simulated), SimError> {
        let scaled = |f: f64| {
            if f == 1.0 {
                self.scenario.clone()
            } else {
                self.scenario.clone().scaled(f)
            }
        };
        Ok((
            simulate(&scaled(self.fit_scale), self.fit_seed)?,
            simulate(&scaled(self.calib_scale), self.calib_seed)?,
        ))
    }
}

/// Benign prompts of a simulation, embedded: the MMD reference. Taken from the
/// *fitting* simulation only, every k-th benign prompt.
pub fn build_reference(sim: &Simulated, embedder: &dyn Embedder, size: usize) -> Reference {
    let texts: Vec<String> = sim
        .events
        .iter()
        .filter(|e| sim.labels.get(&e.account_id).map(String::as_str) == Some("benign"))
        .filter_map(|e| crate::text::new_user_text(e.prompt_text.as_deref()))
        .collect();
    let step = (texts.len() / size.max(1)).max(1);
    let mut buf = vec![0.0; embedder.dim()];
    let vectors: Vec<_> = texts
        .iter()
        .step_by(step)
        .take(size)
        .map(|t| {
            embedder.embed(t, &mut buf);
            quantize(&buf)
        })
        .collect();
    Reference::new(vectors)
}

/// The distinct new user texts of `events` (what the sentinel embeds).
pub fn prompt_texts(events: &[UsageEvent]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter_map(|e| crate::text::new_user_text(e.prompt_text.as_deref()))
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// Embeds every distinct prompt of `events` ahead of a replay, in batches
/// ([`Embedder::prepare`]); `progress(texts done)` after each batch. A replay does it
/// itself; call it first only to show progress.
pub fn prepare_embeddings(
    events: &[UsageEvent],
    embedder: &dyn Embedder,
    progress: &dyn Fn(usize),
) {
    if !embedder.wants_prepare() {
        return;
    }
    let texts = prompt_texts(events);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    embedder.prepare(&refs, progress);
}

/// Replays events through a recording sentinel and returns its snapshots.
pub fn replay(
    events: &[UsageEvent],
    model: Arc<Model>,
    embedder: &Arc<dyn Embedder>,
) -> Result<Vec<Snapshot>, String> {
    replay_with(events, model, embedder, &mut |_| {})
}

/// [`replay`], calling `progress(events done)` every 4,096 events (progress bars).
pub fn replay_with(
    events: &[UsageEvent],
    model: Arc<Model>,
    embedder: &Arc<dyn Embedder>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Snapshot>, String> {
    let cfg = SentinelConfig::new(model, embedder.clone())?;
    prepare_embeddings(events, &**embedder, &|_| {});
    let mut s = Sentinel::new(cfg);
    s.record_snapshots();
    for (i, e) in events.iter().enumerate() {
        s.observe(e);
        if i % 4096 == 4095 {
            progress(i + 1);
        }
    }
    progress(events.len());
    Ok(s.take_snapshots())
}

struct Prepared {
    fit: Vec<Snapshot>,
    fit_labels: BTreeMap<i64, String>,
    cal: Vec<Snapshot>,
    cal_labels: BTreeMap<i64, String>,
    reference: Reference,
    embedder: String,
}

fn prepare(tc: &TrainConfig, embedder: &Arc<dyn Embedder>) -> Result<Prepared, TrainError> {
    let (fit_sim, cal_sim) = tc.simulations()?;
    let reference = build_reference(&fit_sim, &**embedder, 64);
    let base = Arc::new(Model::untrained(embedder.name(), reference.clone()));
    let fit = replay(&fit_sim.events, base.clone(), embedder).map_err(TrainError::Embedder)?;
    let cal = replay(&cal_sim.events, base, embedder).map_err(TrainError::Embedder)?;
    Ok(Prepared {
        fit,
        fit_labels: fit_sim.labels,
        cal,
        cal_labels: cal_sim.labels,
        reference,
        embedder: embedder.name(),
    })
}

fn fit(p: &Prepared, tc: &TrainConfig, exclude: Option<&str>) -> Model {
    let mut model = Model::untrained(p.embedder.clone(), p.reference.clone());
    let mut per_account: HashMap<i64, f64> = HashMap::new();
    for s in &p.fit {
        *per_account.entry(s.account_id).or_default() += 1.0;
    }
    let mut rows: Vec<Features> = Vec::new();
    let mut labels = Vec::new();
    let mut weights = Vec::new();
    for s in &p.fit {
        let label = p
            .fit_labels
            .get(&s.account_id)
            .map(String::as_str)
            .unwrap_or("benign");
        if Some(label) == exclude {
            continue;
        }
        let w = 1.0 / per_account[&s.account_id];
        let harvest = label != "benign";
        if harvest && s.requests < tc.positive_from_requests {
            continue;
        }
        if s.requests >= model.min_requests {
            rows.push(s.account);
            labels.push(harvest);
            weights.push(w);
        }
        if let Some((fc, _)) = &s.cluster {
            rows.push(*fc);
            labels.push(harvest);
            weights.push(w);
        }
    }
    let (shapes, bias) = fit_additive(
        &rows,
        &labels,
        &weights,
        &monotone_mask(),
        &BoostParams::default(),
    );
    model.shapes = shapes;
    model.bias = bias;
    // calibrate the flag threshold on benign accounts of the second seed
    let outcomes = score_snapshots(&model, &p.cal, None);
    let mut benign: Vec<f64> = outcomes
        .iter()
        .filter(|(id, _)| p.cal_labels.get(id).map(String::as_str) == Some("benign"))
        .map(|(_, o)| o.max_score)
        .collect();
    benign.sort_by(|a, b| b.total_cmp(a));
    let k = (tc.target_fpr * benign.len() as f64).floor() as usize;
    let at = benign.get(k).copied().unwrap_or(0.5);
    model.thresholds = Thresholds::from_flag(sigmoid(logit(at) + tc.margin_logit));
    model.trained_on = format!(
        "{} split={:?} fit_seed={} calib_seed={} target_fpr={} excluded={}",
        tc.scenario.name,
        tc.scenario.prompt_split,
        tc.fit_seed,
        tc.calib_seed,
        tc.target_fpr,
        exclude.unwrap_or("none")
    );
    model
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The scenario does not simulate.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The embedder does not fit the model (or the events).
    #[error("{0}")]
    Embedder(String),
}

/// Trains a model (see [`TrainConfig`]) on prompt vectors from `embedder`, which the
/// model then requires.
pub fn train(tc: &TrainConfig, embedder: &Arc<dyn Embedder>) -> Result<Model, TrainError> {
    Ok(fit(&prepare(tc, embedder)?, tc, None))
}

/// The built-in model as JSON: what `train(&TrainConfig::default())` produces,
/// written by `isotope sentinel train --out crates/isotope-sentinel/src/default_model.json`.
/// A test re-trains and compares, so it cannot drift from the simulator and features.
pub const EMBEDDED_MODEL: &str = include_str!("default_model.json");

/// The default model: [`EMBEDDED_MODEL`], parsed and validated once per process (no
/// training at start-up).
pub fn default_model() -> Result<Arc<Model>, String> {
    static MODEL: OnceLock<Result<Arc<Model>, String>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let m: Model = serde_json::from_str(EMBEDDED_MODEL)
                .map_err(|e| format!("the built-in sentinel model does not parse: {e}"))?;
            m.validate()
                .map_err(|e| format!("the built-in sentinel model: {e}"))?;
            Ok(Arc::new(m))
        })
        .clone()
}

#[derive(Clone, Debug, Default)]
struct Outcome {
    max_score: f64,
    max_level: Option<Level>,
    flagged_at: Option<u64>,
    requests: u64,
}

/// Scores snapshots with a model; per account: max score, first flag, final count.
/// `flag` overrides the model's flag threshold (for calibration, `None`).
fn score_snapshots(model: &Model, snaps: &[Snapshot], flag: Option<f64>) -> BTreeMap<i64, Outcome> {
    let mut out: BTreeMap<i64, Outcome> = BTreeMap::new();
    let flag = flag.unwrap_or(model.thresholds.flag);
    for s in snaps {
        let own = if s.requests >= model.min_requests {
            model.score(&s.account)
        } else {
            0.0
        };
        let cl = s
            .cluster
            .as_ref()
            .map(|(f, _)| model.score(f))
            .unwrap_or(0.0);
        let score = own.max(cl);
        let o = out.entry(s.account_id).or_default();
        o.max_score = o.max_score.max(score);
        o.requests = o.requests.max(s.requests);
        let level = model.thresholds.level(score);
        o.max_level = Some(o.max_level.map_or(level, |l| l.max(level)));
        if score >= flag && o.flagged_at.is_none() {
            o.flagged_at = Some(s.requests);
        }
    }
    out
}

/// Per-strategy results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StrategyReport {
    /// Accounts with this label.
    pub accounts: usize,
    /// Of which reached `flag` at some point.
    pub flagged: usize,
    /// `flagged / accounts`.
    pub tpr: f64,
    /// AUC of these accounts' max scores against all benign accounts.
    pub auc: Option<f64>,
    /// Median over flagged accounts of the account's own request count when first
    /// flagged.
    pub median_requests_until_flagged: Option<f64>,
    /// Median requests per account over the whole run.
    pub median_requests: Option<f64>,
    /// Accounts per highest level reached.
    pub levels: BTreeMap<String, usize>,
}

/// Evaluation result (`isotope sentinel eval --json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// What the model was trained on.
    pub model: String,
    /// Usage events replayed.
    pub events: usize,
    /// Benign accounts.
    pub benign_accounts: usize,
    /// Harvesting accounts (all strategies).
    pub harvest_accounts: usize,
    /// Share of harvesting accounts flagged (any strategy).
    pub tpr: f64,
    /// Share of benign accounts ever flagged.
    pub fpr: f64,
    /// Benign accounts ever flagged.
    pub benign_flagged: usize,
    /// Clopper–Pearson 95% upper bound of `fpr`.
    pub fpr_upper95: f64,
    /// ROC AUC of max scores, harvesting vs benign.
    pub auc: Option<f64>,
    /// Median requests until flagged over all flagged harvesting accounts.
    pub median_requests_until_flagged: Option<f64>,
    /// Level thresholds used.
    pub thresholds: Thresholds,
    /// Per strategy.
    pub per_strategy: BTreeMap<String, StrategyReport>,
    /// Benign accounts per highest level reached.
    pub benign_levels: BTreeMap<String, usize>,
    /// Ids of benign accounts flagged (for inspection).
    pub benign_flagged_ids: Vec<i64>,
}

fn report(
    model: &Model,
    snaps: &[Snapshot],
    labels: &BTreeMap<i64, String>,
    events: usize,
) -> EvalReport {
    let outcomes = score_snapshots(model, snaps, None);
    let mut by_label: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
    for (id, label) in labels {
        if let Some(o) = outcomes.get(id) {
            by_label.entry(label.clone()).or_default().push(o);
        }
    }
    let benign = by_label.remove("benign").unwrap_or_default();
    let benign_scores: Vec<f64> = benign.iter().map(|o| o.max_score).collect();
    let levels = |os: &[&Outcome]| {
        let mut m = BTreeMap::new();
        for o in os {
            *m.entry(o.max_level.unwrap_or(Level::Observe).as_str().to_string())
                .or_insert(0) += 1;
        }
        m
    };
    let mut per_strategy = BTreeMap::new();
    let mut all_pos = Vec::new();
    let mut all_rtf = Vec::new();
    let mut flagged_total = 0;
    for (label, os) in &by_label {
        let flagged: Vec<f64> = os
            .iter()
            .filter_map(|o| o.flagged_at.map(|x| x as f64))
            .collect();
        let scores: Vec<f64> = os.iter().map(|o| o.max_score).collect();
        all_pos.extend(scores.iter().copied());
        all_rtf.extend(flagged.iter().copied());
        flagged_total += flagged.len();
        per_strategy.insert(
            label.clone(),
            StrategyReport {
                accounts: os.len(),
                flagged: flagged.len(),
                tpr: flagged.len() as f64 / os.len().max(1) as f64,
                auc: auc(&scores, &benign_scores),
                median_requests_until_flagged: median(&flagged),
                median_requests: median(&os.iter().map(|o| o.requests as f64).collect::<Vec<_>>()),
                levels: levels(os),
            },
        );
    }
    let benign_flagged_ids: Vec<i64> = labels
        .iter()
        .filter(|(_, l)| l.as_str() == "benign")
        .filter(|(id, _)| outcomes.get(id).is_some_and(|o| o.flagged_at.is_some()))
        .map(|(id, _)| *id)
        .collect();
    let nb = benign.len();
    EvalReport {
        model: model.trained_on.clone(),
        events,
        benign_accounts: nb,
        harvest_accounts: all_pos.len(),
        tpr: flagged_total as f64 / all_pos.len().max(1) as f64,
        fpr: benign_flagged_ids.len() as f64 / nb.max(1) as f64,
        benign_flagged: benign_flagged_ids.len(),
        fpr_upper95: clopper_pearson_upper(benign_flagged_ids.len() as u64, nb as u64, 0.05),
        auc: auc(&all_pos, &benign_scores),
        median_requests_until_flagged: median(&all_rtf),
        thresholds: model.thresholds.clone(),
        per_strategy,
        benign_levels: levels(&benign),
        benign_flagged_ids,
    }
}

/// Replays labelled events through the sentinel with `model` and reports TPR per
/// strategy, benign FPR with its Clopper–Pearson bound, AUC and requests until
/// flagged. `labels`: account id → `"benign"` or a strategy name.
pub fn evaluate(
    events: &[UsageEvent],
    labels: &BTreeMap<i64, String>,
    model: Arc<Model>,
    embedder: &Arc<dyn Embedder>,
) -> Result<EvalReport, String> {
    evaluate_with(events, labels, model, embedder, &mut |_| {})
}

/// [`evaluate`] with a progress callback (see [`replay_with`]).
pub fn evaluate_with(
    events: &[UsageEvent],
    labels: &BTreeMap<i64, String>,
    model: Arc<Model>,
    embedder: &Arc<dyn Embedder>,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport, String> {
    let snaps = replay_with(events, model.clone(), embedder, progress)?;
    Ok(report(&model, &snaps, labels, events.len()))
}

/// One held-out strategy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LooEntry {
    /// The strategy left out of training.
    pub strategy: String,
    /// Its accounts in the evaluation traffic.
    pub accounts: usize,
    /// Its TPR when the model never saw it.
    pub tpr: f64,
    /// Its TPR with the model trained on every strategy (same data otherwise).
    pub tpr_trained_on_all: f64,
    /// Its AUC against benign.
    pub auc: Option<f64>,
    /// Its median requests until flagged.
    pub median_requests_until_flagged: Option<f64>,
    /// Benign FPR of that model (threshold recalibrated without the strategy).
    pub fpr: f64,
    /// Clopper–Pearson 95% upper bound of `fpr`.
    pub fpr_upper95: f64,
}

/// Leave-one-strategy-out results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LooReport {
    /// Benign accounts in the evaluation traffic.
    pub benign_accounts: usize,
    /// One entry per strategy present in the evaluation traffic.
    pub entries: Vec<LooEntry>,
    /// Mean of the entries' held-out TPRs (each strategy weighs the same).
    pub mean_tpr: f64,
}

/// For each strategy S: train and calibrate without S's accounts, evaluate on S (and
/// on benign) in `eval` traffic.
pub fn leave_one_out(
    tc: &TrainConfig,
    embedder: &Arc<dyn Embedder>,
    eval: &Simulated,
) -> Result<LooReport, TrainError> {
    let p = prepare(tc, embedder)?;
    let base = Arc::new(Model::untrained(p.embedder.clone(), p.reference.clone()));
    let snaps = replay(&eval.events, base, embedder).map_err(TrainError::Embedder)?;
    let strategies: std::collections::BTreeSet<&String> = eval
        .labels
        .values()
        .filter(|l| l.as_str() != "benign")
        .collect();
    let all = report(&fit(&p, tc, None), &snaps, &eval.labels, eval.events.len());
    let mut entries = Vec::new();
    for s in strategies {
        let model = fit(&p, tc, Some(s));
        let r = report(&model, &snaps, &eval.labels, eval.events.len());
        let st = &r.per_strategy[s];
        entries.push(LooEntry {
            strategy: s.clone(),
            accounts: st.accounts,
            tpr: st.tpr,
            tpr_trained_on_all: all.per_strategy[s].tpr,
            auc: st.auc,
            median_requests_until_flagged: st.median_requests_until_flagged,
            fpr: r.fpr,
            fpr_upper95: r.fpr_upper95,
        });
    }
    let mean_tpr = entries.iter().map(|e| e.tpr).sum::<f64>() / entries.len().max(1) as f64;
    Ok(LooReport {
        benign_accounts: all.benign_accounts,
        entries,
        mean_tpr,
    })
}

/// Throughput and memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// Events observed.
    pub events: usize,
    /// Accounts.
    pub accounts: usize,
    /// Re-scores performed while observing.
    pub rescored: usize,
    /// Single-thread events per second, `observe` including scheduled re-scoring.
    pub events_per_sec_per_core: f64,
    /// Seconds for one `assess` over every account at the end.
    pub assess_all_seconds: f64,
    /// Mean bytes per account (sketches plus shared linker indexes).
    pub bytes_per_account: f64,
    /// The prompt embedder (its cache is not counted per account).
    pub embedder: String,
}

/// Measures `observe` throughput on one core and memory per account. Embedding is
/// part of `observe` and is measured cold (nothing prepared), as a server meets it.
pub fn bench(
    events: &[UsageEvent],
    model: Arc<Model>,
    embedder: &Arc<dyn Embedder>,
) -> Result<BenchReport, String> {
    let mut s = Sentinel::new(SentinelConfig::new(model, embedder.clone())?);
    let start = Instant::now();
    let mut rescored = 0;
    for e in events {
        rescored += s.observe(e).is_some() as usize;
    }
    let secs = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let now = events.last().map(|e| e.created_at_ms).unwrap_or(0);
    let _ = s.assess(now);
    Ok(BenchReport {
        events: events.len(),
        accounts: s.accounts(),
        rescored,
        events_per_sec_per_core: events.len() as f64 / secs.max(1e-9),
        assess_all_seconds: t.elapsed().as_secs_f64(),
        bytes_per_account: s.bytes_per_account(),
        embedder: s.embedder_name(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::HashedEmbedder;
    use crate::features::FEATURE_NAMES;

    #[test]
    fn embedded_model_parses_and_matches_the_feature_schema() {
        let m = default_model().expect("the embedded model loads");
        assert_eq!(m.features, FEATURE_NAMES.map(String::from).to_vec());
        m.validate().unwrap();
        assert!(m.thresholds.flag > 0.0 && m.thresholds.flag < 1.0);
        assert!(!m.reference.vectors.is_empty());
        assert_eq!(m.embedder, HashedEmbedder::default().name());
        assert!(m.trained_on.contains("split=Tune"), "{}", m.trained_on);
    }

    #[test]
    fn leaving_a_strategy_out_removes_its_rows_and_reports_each_strategy() {
        let tc = TrainConfig {
            scenario: Scenario::training().scaled(0.05),
            ..TrainConfig::default()
        };
        let emb: Arc<dyn Embedder> = Arc::new(HashedEmbedder::default());
        let p = prepare(&tc, &emb).unwrap();
        let all = fit(&p, &tc, None);
        // excluding a label nobody has changes nothing; excluding a real one does
        assert_eq!(all.shapes, fit(&p, &tc, Some("no_such_strategy")).shapes);
        let without = fit(&p, &tc, Some("soft_label"));
        assert_ne!(all.shapes, without.shapes);
        assert!(without.trained_on.contains("excluded=soft_label"));
        without.validate().unwrap();

        let ev = simulate(&Scenario::default_mixed().scaled(0.05), 11).unwrap();
        let r = leave_one_out(&tc, &emb, &ev).unwrap();
        let mut expect: Vec<&str> = ev
            .labels
            .values()
            .map(String::as_str)
            .filter(|l| *l != "benign")
            .collect();
        expect.sort();
        expect.dedup();
        let got: Vec<&str> = r.entries.iter().map(|e| e.strategy.as_str()).collect();
        assert_eq!(got, expect);
        for e in &r.entries {
            assert!(e.accounts > 0 && (0.0..=1.0).contains(&e.tpr), "{e:?}");
            assert!(e.fpr_upper95 >= e.fpr);
        }
        assert!(r.benign_accounts > 20);
    }
}
