//! Streaming text: UTF-8-safe incremental detokenization and stop strings.
//!
//! Both are pure byte/string logic, kept apart from llama.cpp so they can be tested
//! exhaustively without a model.

/// Turns the byte pieces of successive tokens into text that is always valid UTF-8.
///
/// A byte-level BPE vocabulary splits multi-byte characters across tokens (an emoji is
/// often two or three tokens). Emitting each piece with lossy decoding would print
/// replacement characters mid-stream; instead the incomplete tail is held back until
/// the character is complete. Bytes that can never become valid UTF-8 are emitted as
/// U+FFFD, exactly once, so a broken model cannot stall the stream.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add the bytes of one token and return the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("checked valid"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Invalid sequence: replace it and carry on after it.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// End of stream: whatever is still held is an incomplete character.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// Finds stop strings in streamed text and holds back any tail that could still turn
/// into one, so a stop string is never emitted, not even in part.
#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Emit this text; no stop string yet.
    Continue(String),
    /// A stop string matched: emit this text (everything before the match) and stop.
    Stopped(String),
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Add newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(text.to_owned());
        }
        self.held.push_str(text);
        // The earliest match wins, whichever stop string it is.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopScan::Continue(out)
    }

    /// End of generation without a stop string: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let h = self.held.as_str();
        let mut best = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(h.len());
            for k in (best + 1..=max).rev() {
                let start = h.len() - k;
                if h.is_char_boundary(start) && s.as_bytes().starts_with(&h.as_bytes()[start..]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_multibyte_character_is_held_until_complete() {
        let bytes = "a🦀b".as_bytes();
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&bytes[..2]), "a"); // 'a' + first byte of the crab
        assert_eq!(s.push(&bytes[2..4]), "");
        assert_eq!(s.push(&bytes[4..]), "🦀b");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_one_replacement_each() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&[b'x', 0xff, b'y']), "x\u{fffd}y");
        assert_eq!(s.push(&[0xe2, 0x82]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_across_chunks_is_never_emitted() {
        let mut m = StopMatcher::new(["</end>".to_string()]);
        assert_eq!(m.push("hello </"), StopScan::Continue("hello ".into()));
        assert_eq!(m.push("en"), StopScan::Continue("".into()));
        assert_eq!(m.push("d> more"), StopScan::Stopped("".into()));
    }

    #[test]
    fn false_alarm_prefix_is_released() {
        let mut m = StopMatcher::new(["STOP".to_string()]);
        assert_eq!(m.push("ST"), StopScan::Continue("".into()));
        assert_eq!(m.push("ART"), StopScan::Continue("START".into()));
        assert_eq!(m.push("S"), StopScan::Continue("".into()));
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(["bb".to_string(), "a".to_string()]);
        assert_eq!(m.push("xxbbya"), StopScan::Stopped("xx".into()));
    }

    proptest! {
        /// Whatever the chunking, the streamed text equals the whole text cut at the
        /// first stop string.
        #[test]
        fn chunking_does_not_matter(text in "[ab🦀é ]{0,40}", stop in "[ab🦀]{1,3}",
                                    cuts in prop::collection::vec(0usize..200, 0..10)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut utf8 = Utf8Stream::default();
            let mut stops = StopMatcher::new([stop.clone()]);
            let mut out = String::new();
            let mut stopped = false;
            for w in cuts.windows(2) {
                let piece = utf8.push(&bytes[w[0]..w[1]]);
                match stops.push(&piece) {
                    StopScan::Continue(t) => out.push_str(&t),
                    StopScan::Stopped(t) => { out.push_str(&t); stopped = true; break; }
                }
            }
            if !stopped {
                out.push_str(&utf8.finish());
                out.push_str(&stops.finish());
            }
            let expect = match text.find(&stop) { Some(i) => &text[..i], None => &text[..] };
            prop_assert_eq!(out, expect);
        }
    }
}
