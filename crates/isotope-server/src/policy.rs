//! Output policy: what a request may receive, decided per request from the API key's
//! risk level.
//!
//! The level comes from the key's override in the store (set by an operator) or, later,
//! from the sentinel; the server only enforces. Ordinary (`observe`) accounts get the
//! configured global caps and nothing else. Policy caps are applied silently (the
//! provider does not tell a suspected harvester what it changed) and recorded on the
//! usage event, whereas a value over the *global* caps is a 400, as OpenAI does.

use serde::{Deserialize, Serialize};

pub use isotope_store::{Level, ManualLevel};

/// The level a request is served at: an operator's pinned level wins outright;
/// otherwise the stricter of the operator's floor and the sentinel's level. Why a
/// floor by default: an operator who marks a key `degrade` means "at least degrade" —
/// the sentinel seeing it get worse must still be able to block it. Pinning
/// (`pin:observe`) is how an operator overrules a false alarm.
pub fn effective_level(manual: Option<ManualLevel>, sentinel: Level) -> Level {
    match manual {
        Some(m) if m.pinned => m.level,
        Some(m) => m.level.max(sentinel),
        None => sentinel,
    }
}

/// What one level allows. `None` = no extra cap beyond the global ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LevelPolicy {
    /// Cap on `max_tokens` per choice.
    pub max_tokens: Option<u32>,
    /// Cap on `top_logprobs` (chat) / `logprobs` (completions).
    pub top_logprobs: Option<u32>,
    /// Cap on `n`.
    pub n: Option<u32>,
    /// Return no log-probabilities at all.
    pub drop_logprobs: bool,
    /// Divide the key's requests-per-minute and tokens-per-minute limits by this.
    pub rate_divisor: u32,
    /// Refuse every request (403).
    pub block: bool,
    /// Round returned log-probabilities to this many decimals (0–6). Rounding hides
    /// the small differences a student learns most from while a person reading
    /// "-0.3" loses nothing.
    pub logprob_decimals: Option<u32>,
    /// Standard deviation (nats) of Gaussian noise on returned log-probabilities; see
    /// [`crate::logprobs::obscure`] for how the noise keeps a proper distribution.
    pub logprob_noise: Option<f32>,
    /// Refuse `echo` together with `logprobs` (the teacher's log-probabilities of
    /// client-chosen text) even where the server allows it.
    pub refuse_echo: bool,
    /// Antidistillation sampling at this strength λ (needs `[defence]` in the
    /// config: a proxy student and its gradient). `None` or 0: off.
    pub antidistill_lambda: Option<f32>,
    /// What happens to a reasoning section (`<think>…</think>`) of the answer.
    pub reasoning: ReasoningPolicy,
}

impl Default for LevelPolicy {
    fn default() -> Self {
        Self {
            max_tokens: None,
            top_logprobs: None,
            n: None,
            drop_logprobs: false,
            rate_divisor: 1,
            block: false,
            logprob_decimals: None,
            logprob_noise: None,
            refuse_echo: false,
            antidistill_lambda: None,
            reasoning: ReasoningPolicy::Whole,
        }
    }
}

/// What a response's reasoning section becomes — as providers do with hidden chain of
/// thought: the tokens are still generated (the answer depends on them) and counted,
/// but a suspected harvester need not receive them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningPolicy {
    /// Returned as generated.
    #[default]
    Whole,
    /// Replaced by a short summary the model writes in a second pass.
    Summarise,
    /// Removed; only the answer after it is returned.
    Withhold,
}

impl LevelPolicy {
    /// Check ranges; the message names the setting (`level` is the table key).
    pub fn validate(&self, level: Level) -> Result<(), String> {
        let at = |what: &str| format!("policy.{}.{what}", level.as_str());
        if self.rate_divisor == 0 {
            return Err(format!("{} must be at least 1", at("rate_divisor")));
        }
        if self.logprob_decimals.is_some_and(|d| d > 6) {
            return Err(format!(
                "{} must be between 0 and 6",
                at("logprob_decimals")
            ));
        }
        if self
            .logprob_noise
            .is_some_and(|s| !(s.is_finite() && (0.0..=10.0).contains(&s)))
        {
            return Err(format!(
                "{} must be a standard deviation in nats between 0 and 10",
                at("logprob_noise")
            ));
        }
        if self
            .antidistill_lambda
            .is_some_and(|l| !(l.is_finite() && l >= 0.0))
        {
            return Err(format!(
                "{} must be a finite number ≥ 0",
                at("antidistill_lambda")
            ));
        }
        Ok(())
    }

    /// The antidistillation strength in force (`None` when off).
    pub fn lambda(&self) -> Option<f32> {
        self.antidistill_lambda.filter(|&l| l > 0.0)
    }
}

/// The policy table: one [`LevelPolicy`] per level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyTable {
    pub observe: LevelPolicy,
    pub flag: LevelPolicy,
    pub throttle: LevelPolicy,
    pub degrade: LevelPolicy,
    pub block: LevelPolicy,
}

impl Default for PolicyTable {
    fn default() -> Self {
        Self {
            observe: LevelPolicy::default(),
            flag: LevelPolicy::default(),
            throttle: LevelPolicy {
                rate_divisor: 4,
                top_logprobs: Some(5),
                logprob_decimals: Some(1),
                refuse_echo: true,
                ..LevelPolicy::default()
            },
            degrade: LevelPolicy {
                rate_divisor: 4,
                drop_logprobs: true,
                max_tokens: Some(256),
                n: Some(1),
                refuse_echo: true,
                reasoning: ReasoningPolicy::Withhold,
                ..LevelPolicy::default()
            },
            block: LevelPolicy {
                block: true,
                ..LevelPolicy::default()
            },
        }
    }
}

impl PolicyTable {
    /// Check every level's ranges.
    pub fn validate(&self) -> Result<(), String> {
        Level::ALL
            .iter()
            .try_for_each(|&l| self.for_level(l).validate(l))
    }

    /// Whether some level switches antidistillation sampling on.
    pub fn uses_antidistill(&self) -> bool {
        Level::ALL
            .iter()
            .any(|&l| self.for_level(l).lambda().is_some())
    }

    pub fn for_level(&self, level: Level) -> &LevelPolicy {
        match level {
            Level::Observe => &self.observe,
            Level::Flag => &self.flag,
            Level::Throttle => &self.throttle,
            Level::Degrade => &self.degrade,
            Level::Block => &self.block,
        }
    }
}

/// The request-shaping knobs a policy acts on, before and after.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Shape {
    pub max_tokens: u32,
    pub n: u32,
    /// Whether log-probabilities of the sampled tokens are returned.
    pub logprobs: bool,
    /// How many alternatives per token.
    pub top_logprobs: u32,
}

/// How the output is treated beyond its shape (what the client cannot ask for).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Treatment {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_decimals: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_noise: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub antidistill_lambda: Option<f32>,
    pub reasoning: ReasoningPolicy,
}

/// A policy decision, recorded on the usage event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Applied {
    pub level: Level,
    /// What the client asked for.
    pub requested: Shape,
    /// What it gets.
    pub granted: Shape,
    /// How the output is treated.
    pub treatment: Treatment,
}

impl Applied {
    /// True when the policy changed nothing.
    pub fn unchanged(&self) -> bool {
        self.requested == self.granted && self.treatment == Treatment::default()
    }
}

/// Apply `policy` (at `level`) to a request shape.
pub fn apply(level: Level, policy: &LevelPolicy, requested: Shape) -> Applied {
    let mut granted = requested.clone();
    if let Some(cap) = policy.max_tokens {
        granted.max_tokens = granted.max_tokens.min(cap.max(1));
    }
    if let Some(cap) = policy.n {
        granted.n = granted.n.min(cap.max(1));
    }
    if let Some(cap) = policy.top_logprobs {
        granted.top_logprobs = granted.top_logprobs.min(cap);
    }
    if policy.drop_logprobs {
        granted.logprobs = false;
        granted.top_logprobs = 0;
    }
    let treatment = Treatment {
        // Log-prob treatment only matters when log-probs are returned.
        logprob_decimals: policy.logprob_decimals.filter(|_| granted.logprobs),
        logprob_noise: policy
            .logprob_noise
            .filter(|&s| granted.logprobs && s > 0.0),
        antidistill_lambda: policy.lambda(),
        reasoning: policy.reasoning,
    };
    Applied {
        level,
        requested,
        granted,
        treatment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask() -> Shape {
        Shape {
            max_tokens: 1000,
            n: 4,
            logprobs: true,
            top_logprobs: 20,
        }
    }

    #[test]
    fn observe_and_flag_change_nothing_by_default() {
        let table = PolicyTable::default();
        for level in [Level::Observe, Level::Flag] {
            let a = apply(level, table.for_level(level), ask());
            assert!(a.unchanged(), "{level:?} changed {a:?}");
        }
    }

    #[test]
    fn each_level_applies_exactly_its_caps() {
        let table = PolicyTable::default();
        let t = apply(Level::Throttle, table.for_level(Level::Throttle), ask());
        assert_eq!(
            t.granted,
            Shape {
                top_logprobs: 5,
                ..ask()
            }
        );
        let d = apply(Level::Degrade, table.for_level(Level::Degrade), ask());
        assert_eq!(
            d.granted,
            Shape {
                max_tokens: 256,
                n: 1,
                logprobs: false,
                top_logprobs: 0
            }
        );
        assert_eq!(
            t.treatment,
            Treatment {
                logprob_decimals: Some(1),
                ..Treatment::default()
            }
        );
        assert_eq!(
            d.treatment,
            Treatment {
                reasoning: ReasoningPolicy::Withhold,
                ..Treatment::default()
            }
        );
        assert!(table.for_level(Level::Throttle).refuse_echo);
        assert!(table.for_level(Level::Degrade).refuse_echo);
        assert!(!table.for_level(Level::Observe).refuse_echo);
        assert!(table.for_level(Level::Block).block);
        assert!(!table.for_level(Level::Degrade).block);
    }

    /// A table that sets every lever at every level except `observe`: the benign
    /// level must still come out untouched, and each other level gets exactly its own
    /// settings.
    #[test]
    fn every_lever_applies_at_its_level_only() {
        let strict = |i: u32| LevelPolicy {
            max_tokens: Some(100 + i),
            top_logprobs: Some(i),
            n: Some(1),
            drop_logprobs: false,
            rate_divisor: 2,
            block: false,
            logprob_decimals: Some(i),
            logprob_noise: Some(0.1 * i as f32),
            refuse_echo: true,
            antidistill_lambda: Some(i as f32),
            reasoning: ReasoningPolicy::Summarise,
        };
        let table = PolicyTable {
            observe: LevelPolicy::default(),
            flag: strict(1),
            throttle: strict(2),
            degrade: strict(3),
            block: strict(4),
        };
        table.validate().unwrap();
        assert!(table.uses_antidistill());
        let o = apply(Level::Observe, table.for_level(Level::Observe), ask());
        assert!(o.unchanged(), "benign level changed: {o:?}");
        for (i, level) in [Level::Flag, Level::Throttle, Level::Degrade, Level::Block]
            .into_iter()
            .enumerate()
        {
            let i = i as u32 + 1;
            let a = apply(level, table.for_level(level), ask());
            assert_eq!(a.level, level);
            assert_eq!(
                a.granted,
                Shape {
                    max_tokens: 100 + i,
                    n: 1,
                    logprobs: true,
                    top_logprobs: i
                }
            );
            assert_eq!(
                a.treatment,
                Treatment {
                    logprob_decimals: Some(i),
                    logprob_noise: Some(0.1 * i as f32),
                    antidistill_lambda: Some(i as f32),
                    reasoning: ReasoningPolicy::Summarise,
                }
            );
        }
        // Log-prob treatment is not recorded when no log-probs are returned.
        let no_lp = Shape {
            logprobs: false,
            top_logprobs: 0,
            ..ask()
        };
        let a = apply(Level::Flag, table.for_level(Level::Flag), no_lp);
        assert_eq!(a.treatment.logprob_decimals, None);
        assert_eq!(a.treatment.logprob_noise, None);
    }

    #[test]
    fn validation_names_the_setting() {
        let mut table = PolicyTable::default();
        table.degrade.logprob_noise = Some(-1.0);
        let e = table.validate().unwrap_err();
        assert!(e.contains("policy.degrade.logprob_noise"), "{e}");
        let mut table = PolicyTable::default();
        table.flag.antidistill_lambda = Some(f32::NAN);
        assert!(table
            .validate()
            .unwrap_err()
            .contains("policy.flag.antidistill_lambda"));
        assert!(!PolicyTable::default().uses_antidistill());
    }

    #[test]
    fn caps_never_raise_a_request() {
        let small = Shape {
            max_tokens: 10,
            n: 1,
            logprobs: false,
            top_logprobs: 0,
        };
        let table = PolicyTable::default();
        for level in Level::ALL {
            let a = apply(level, table.for_level(level), small.clone());
            assert!(a.granted.max_tokens <= 10 && a.granted.n <= 1 && !a.granted.logprobs);
        }
    }

    #[test]
    fn manual_floor_sentinel_and_pin_precedence() {
        let floor = |level| {
            Some(ManualLevel {
                level,
                pinned: false,
            })
        };
        let pin = |level| {
            Some(ManualLevel {
                level,
                pinned: true,
            })
        };
        assert_eq!(effective_level(None, Level::Observe), Level::Observe);
        assert_eq!(effective_level(None, Level::Degrade), Level::Degrade);
        // a floor is raised by the sentinel, never lowered by it
        assert_eq!(
            effective_level(floor(Level::Throttle), Level::Observe),
            Level::Throttle
        );
        assert_eq!(
            effective_level(floor(Level::Throttle), Level::Block),
            Level::Block
        );
        // a pin wins both ways
        assert_eq!(
            effective_level(pin(Level::Observe), Level::Block),
            Level::Observe
        );
        assert_eq!(
            effective_level(pin(Level::Block), Level::Observe),
            Level::Block
        );
        for s in Level::ALL {
            for m in Level::ALL {
                assert!(effective_level(floor(m), s) >= s.max(m));
                assert_eq!(effective_level(pin(m), s), m);
            }
        }
    }

    #[test]
    fn levels_parse_and_print() {
        for level in Level::ALL {
            assert_eq!(level.as_str().parse::<Level>().unwrap(), level);
        }
        assert!("nope".parse::<Level>().is_err());
    }
}
