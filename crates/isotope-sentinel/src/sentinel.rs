//! The online sentinel: usage events in, assessments out.

use std::collections::HashMap;
use std::sync::Arc;

use isotope_store::UsageEvent;
use serde::{Deserialize, Serialize};

use crate::cluster::{LinkConfig, Linker};
use crate::embed::{quantize, Embedder, HashedEmbedder};
use crate::features::{
    centroid_cosine, topic_cell, AccountState, Features, PromptInfo, SketchConfig, Sums,
};
use crate::model::{Level, Model, Reason};
use crate::sketch::{band_keys, minhash};
use crate::text;

/// Configuration of a [`Sentinel`].
#[derive(Clone)]
pub struct SentinelConfig {
    /// Sketch sizes.
    pub sketch: SketchConfig,
    /// Sybil linking weights.
    pub link: LinkConfig,
    /// The trained model (weights, thresholds, benign reference).
    pub model: Arc<Model>,
    /// Prompt embedder; must be the one the model was trained with.
    pub embedder: Arc<dyn Embedder>,
}

impl SentinelConfig {
    /// Default sketches and linking with this model and embedder. Refuses an
    /// embedder other than the one the model was trained with (its vectors would be
    /// meaningless to the model's reference and weights).
    pub fn new(model: Arc<Model>, embedder: Arc<dyn Embedder>) -> Result<Self, String> {
        if embedder.name() != model.embedder {
            return Err(format!(
                "the sentinel model was trained with embedder {:?}, not {:?}",
                model.embedder,
                embedder.name()
            ));
        }
        Ok(SentinelConfig {
            sketch: SketchConfig::default(),
            link: LinkConfig::default(),
            model,
            embedder,
        })
    }

    /// [`SentinelConfig::new`] with the [`HashedEmbedder`], for models trained with it
    /// (the built-in one). Panics if the model wants another embedder: use `new`.
    pub fn with_model(model: Arc<Model>) -> Self {
        Self::new(model, Arc::new(HashedEmbedder::default())).expect("a hashed-embedder model")
    }
}

/// The sentinel's judgement of one account at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The account.
    pub account_id: i64,
    /// Smallest account id in its Sybil cluster (its own id when alone).
    pub cluster_id: i64,
    /// Accounts in the cluster.
    pub cluster_size: usize,
    /// Requests the account made so far.
    pub requests: u64,
    /// When it was computed (ms since the epoch, event time).
    pub at_ms: i64,
    /// `max(account_score, cluster_score)`.
    pub score: f64,
    /// The account's own score (0 below the model's minimum request count).
    pub account_score: f64,
    /// The cluster's score, when in a cluster of two or more.
    pub cluster_score: Option<f64>,
    /// Policy level of `score`, with hysteresis on the way down
    /// ([`Thresholds::level_after`] from the account's previous level): an account's
    /// level is the max of its own and its cluster's.
    pub level: Level,
    /// The features behind the score (top contributions of the larger side).
    pub reasons: Vec<Reason>,
}

/// A feature snapshot taken whenever an account was re-scored; evaluation and
/// training replay traffic once and then score snapshots with any model.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Account.
    pub account_id: i64,
    /// Its request count then.
    pub requests: u64,
    /// Event time.
    pub at_ms: i64,
    /// Account features.
    pub account: Features,
    /// Cluster features and size, when in a cluster of two or more.
    pub cluster: Option<(Features, usize)>,
}

struct Slot {
    id: i64,
    state: AccountState,
    next_score_n: u64,
    last_score_ms: i64,
    last: Option<Assessment>,
}

/// Minutes of event time after which an account with new events is re-scored even
/// if its request count did not grow enough.
const RESCORE_EVERY_MS: i64 = 30 * 60_000;

/// Per-account features, Sybil clusters and the risk model, fed one usage event at a
/// time. It decides levels; the server enforces them.
pub struct Sentinel {
    cfg: SentinelConfig,
    slots: Vec<Slot>,
    index: HashMap<i64, u32>,
    linker: Linker,
    buf: Vec<f32>,
    record: Option<Vec<Snapshot>>,
}

impl Sentinel {
    /// A sentinel with no accounts yet.
    pub fn new(cfg: SentinelConfig) -> Self {
        let dim = cfg.embedder.dim();
        Sentinel {
            linker: Linker::new(cfg.link.clone()),
            cfg,
            slots: Vec::new(),
            index: HashMap::new(),
            buf: vec![0.0; dim],
            record: None,
        }
    }

    /// Keeps every re-score's features (for training and evaluation).
    pub fn record_snapshots(&mut self) {
        self.record = Some(Vec::new());
    }

    /// The snapshots recorded so far.
    pub fn take_snapshots(&mut self) -> Vec<Snapshot> {
        self.record.take().unwrap_or_default()
    }

    /// Embeds the prompts of a batch of events ahead of [`Sentinel::observe`]ing them
    /// (a replay, e.g. the server's catch-up from its store): batched, which a model
    /// embedder does faster than one at a time. Nothing for the hashed embedder.
    pub fn prepare_embeddings(&self, events: &[UsageEvent]) {
        crate::eval::prepare_embeddings(events, &*self.cfg.embedder, &|_| {});
    }

    /// Name of the prompt embedder in use.
    pub fn embedder_name(&self) -> String {
        self.cfg.embedder.name()
    }

    /// The model in use.
    pub fn model(&self) -> &Model {
        &self.cfg.model
    }

    /// What one prompt contributes (text, MinHash bands, embedding).
    fn prompt_info(&mut self, ev: &UsageEvent) -> PromptInfo {
        let Some(t) = text::new_user_text(ev.prompt_text.as_deref()) else {
            return PromptInfo {
                bands: None,
                embedding: None,
                reasoning: false,
            };
        };
        let w = text::words(&t);
        let bands = minhash(text::shingles(&w)).map(|s| band_keys(&s));
        let embedding = if w.is_empty() {
            None
        } else {
            self.cfg.embedder.embed(&t, &mut self.buf);
            Some(quantize(&self.buf))
        };
        PromptInfo {
            bands,
            embedding,
            reasoning: text::asks_reasoning(&t),
        }
    }

    /// Folds one usage event in. Returns a fresh assessment when the account was due
    /// for re-scoring (every request up to 8, then each time its request count grew by
    /// an eighth, or 30 minutes of event time after the last score), `None` otherwise;
    /// [`Sentinel::level`] gives the latest level at any time.
    pub fn observe(&mut self, ev: &UsageEvent) -> Option<Assessment> {
        let info = self.prompt_info(ev);
        let dim = self.cfg.embedder.dim();
        let next = self.slots.len() as u32;
        let a = *self.index.entry(ev.account_id).or_insert(next);
        if a == next {
            self.slots.push(Slot {
                id: ev.account_id,
                state: AccountState::new(&self.cfg.sketch, ev.account_id as u64, dim),
                next_score_n: 1,
                last_score_ms: i64::MIN / 2,
                last: None,
            });
        }
        let slot = &mut self.slots[a as usize];
        // template bands this account already used: evidence for the linker
        let reused: Vec<u32> = match &info.bands {
            Some(b) => slot.state.ring().matching(b),
            None => Vec::new(),
        };
        slot.state.observe(ev, &info, &self.cfg.sketch);
        let slots = &self.slots;
        let activity = |b: u32| {
            let s = &slots[b as usize].state;
            (s.activity, s.activity_slot)
        };
        self.linker.observe(
            a,
            ev.client_addr.as_deref(),
            ev.user_agent.as_deref(),
            &reused,
            &activity,
        );
        let slot = &self.slots[a as usize];
        let n = slot.state.n;
        let due =
            n >= slot.next_score_n || ev.created_at_ms - slot.last_score_ms >= RESCORE_EVERY_MS;
        if !due {
            return None;
        }
        let now = ev.created_at_ms;
        let s = &mut self.slots[a as usize];
        s.next_score_n = if n < 8 { n + 1 } else { n + n.div_ceil(8) };
        s.last_score_ms = now;
        if n >= 10 {
            let c = s.state.centroid().to_vec();
            let mut unit = c.clone();
            crate::embed::normalize(&mut unit);
            let cell = topic_cell(&quantize(&unit));
            let slots = &self.slots;
            let cos = |b: u32| centroid_cosine(&c, slots[b as usize].state.centroid());
            let activity = |b: u32| {
                let s = &slots[b as usize].state;
                (s.activity, s.activity_slot)
            };
            self.linker.observe_centroid(a, cell, &cos, &activity);
        }
        let assessment = self.assess_slot(a, now);
        self.slots[a as usize].last = Some(assessment.clone());
        Some(assessment)
    }

    fn assess_slot(&mut self, a: u32, now: i64) -> Assessment {
        let model = self.cfg.model.clone();
        let members: Vec<u32> = self.linker.members(a).to_vec();
        let slot = &self.slots[a as usize];
        let fa = slot.state.features(now, &model.reference);
        let n = slot.state.n;
        let account_score = if n >= model.min_requests {
            model.score(&fa)
        } else {
            0.0
        };
        let (cluster, cluster_score) = if members.len() >= 2 {
            let mut sums = Sums::default();
            let mut samples = Vec::new();
            for &m in members.iter().take(64) {
                let st = &self.slots[m as usize].state;
                sums.add(st, now);
                samples.push(st.sample().iter().take(8).map(|v| v.as_slice()).collect());
            }
            let fc = sums.features(&samples, &model.reference);
            (Some((fc, members.len())), Some(model.score(&fc)))
        } else {
            (None, None)
        };
        let cluster_id = members
            .iter()
            .map(|&m| self.slots[m as usize].id)
            .min()
            .unwrap_or(slot.id);
        let score = account_score.max(cluster_score.unwrap_or(0.0));
        let reasons = match (&cluster, cluster_score) {
            (Some((fc, _)), Some(cs)) if cs > account_score => model.reasons(fc, 4, "cluster"),
            _ => model.reasons(&fa, 4, "account"),
        };
        if let Some(rec) = &mut self.record {
            rec.push(Snapshot {
                account_id: slot.id,
                requests: n,
                at_ms: now,
                account: fa,
                cluster,
            });
        }
        Assessment {
            account_id: slot.id,
            cluster_id,
            cluster_size: members.len().max(1),
            requests: n,
            at_ms: now,
            score,
            account_score,
            cluster_score,
            level: match &slot.last {
                Some(prev) => model.thresholds.level_after(prev.level, score),
                None => model.thresholds.level(score),
            },
            reasons,
        }
    }

    /// The latest level of an account: the max of its own last assessment and those
    /// of its cluster's members (`Observe` for an unknown account).
    pub fn level(&mut self, account_id: i64) -> Level {
        let Some(&a) = self.index.get(&account_id) else {
            return Level::Observe;
        };
        let members = self.linker.members(a).to_vec();
        members
            .iter()
            .filter_map(|&m| self.slots[m as usize].last.as_ref().map(|x| x.level))
            .max()
            .unwrap_or(Level::Observe)
    }

    /// The accounts in `account_id`'s Sybil cluster, itself included (empty for an
    /// unknown account). When one member is re-scored, every member's
    /// [`Sentinel::level`] may change, so the server re-reads all of them.
    pub fn cluster_members(&mut self, account_id: i64) -> Vec<i64> {
        let Some(&a) = self.index.get(&account_id) else {
            return Vec::new();
        };
        self.linker
            .members(a)
            .iter()
            .map(|&m| self.slots[m as usize].id)
            .collect()
    }

    /// Re-scores every account at `now_ms` (a batch job, e.g. `isotope sentinel score`
    /// or a periodic task in the server), sorted by score, highest first.
    pub fn assess(&mut self, now_ms: i64) -> Vec<Assessment> {
        let mut out: Vec<Assessment> = (0..self.slots.len() as u32)
            .map(|a| self.assess_slot(a, now_ms))
            .collect();
        for (a, x) in out.iter().enumerate() {
            self.slots[a].last = Some(x.clone());
        }
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.account_id.cmp(&b.account_id))
        });
        out
    }

    /// Accounts seen.
    pub fn accounts(&self) -> usize {
        self.slots.len()
    }

    /// Mean bytes per account, including the shared linker indexes.
    pub fn bytes_per_account(&self) -> f64 {
        if self.slots.is_empty() {
            return 0.0;
        }
        let own: usize = self.slots.iter().map(|s| s.state.bytes() + 64).sum();
        (own + self.linker.bytes() + self.index.len() * 24) as f64 / self.slots.len() as f64
    }
}
