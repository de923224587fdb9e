//! Sampling parameters and their validation.

use serde::{Deserialize, Serialize};

/// How the next token is chosen from the logits.
///
/// Field names follow the OpenAI API where one exists, llama.cpp otherwise. The
/// defaults are "plain sampling at temperature 1": every truncation is off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax), which also makes the draw ignore
    /// the random stream.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to at
    /// least `top_p`; `1.0` disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times that of the most likely
    /// token; `0.0` disables.
    pub min_p: f32,
    /// CTRL-style repetition penalty over the last [`Self::penalty_last_n`] context
    /// tokens (prompt included): positive logits are divided by it, negative ones
    /// multiplied. `1.0` disables.
    pub repetition_penalty: f32,
    /// How many trailing context tokens the repetition penalty looks at; `0` means the
    /// whole context.
    pub penalty_last_n: usize,
    /// OpenAI `frequency_penalty`: subtracted once per earlier occurrence of the token
    /// in the generated text. Range [-2, 2].
    pub frequency_penalty: f32,
    /// OpenAI `presence_penalty`: subtracted once if the token already occurs in the
    /// generated text. Range [-2, 2].
    pub presence_penalty: f32,
    /// Seed of the per-request random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            penalty_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampling parameter outside its valid range. The message names the parameter and
/// the range so that a CLI or API user knows what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid sampling parameter `{param}`: {message}")]
pub struct ParamError {
    /// Parameter name, as spelled in [`SamplingParams`].
    pub param: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), every other knob off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// True when the draw is an argmax and does not consume randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Check every field against its documented range.
    pub fn validate(&self) -> Result<(), ParamError> {
        fn err(param: &'static str, message: String) -> Result<(), ParamError> {
            Err(ParamError { param, message })
        }
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=100.0).contains(&t) {
            return err("temperature", format!("must be in [0, 100], got {t}"));
        }
        let p = self.top_p;
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return err("top_p", format!("must be in (0, 1], got {p}"));
        }
        let m = self.min_p;
        if !m.is_finite() || !(0.0..=1.0).contains(&m) {
            return err("min_p", format!("must be in [0, 1], got {m}"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return err("repetition_penalty", format!("must be > 0, got {r}"));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return err(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
    }

    #[test]
    fn rejects_out_of_range_with_the_parameter_name() {
        let cases = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            },
        ];
        let names = [
            "temperature",
            "temperature",
            "top_p",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
        ];
        for (p, name) in cases.iter().zip(names) {
            let e = p.validate().unwrap_err();
            assert_eq!(e.param, name);
            assert!(e.to_string().contains(name));
        }
    }
}
