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
        }
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
                ..LevelPolicy::default()
            },
            degrade: LevelPolicy {
                rate_divisor: 4,
                drop_logprobs: true,
                max_tokens: Some(256),
                n: Some(1),
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

/// A policy decision, recorded on the usage event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Applied {
    pub level: Level,
    /// What the client asked for.
    pub requested: Shape,
    /// What it gets.
    pub granted: Shape,
}

impl Applied {
    /// True when the policy changed nothing.
    pub fn unchanged(&self) -> bool {
        self.requested == self.granted
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
    Applied {
        level,
        requested,
        granted,
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
        assert!(table.for_level(Level::Block).block);
        assert!(!table.for_level(Level::Degrade).block);
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
