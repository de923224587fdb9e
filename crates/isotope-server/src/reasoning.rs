//! The reasoning-trace policy's text filter: finds `<think>…</think>` sections in a
//! stream of token texts and holds them back.
//!
//! Why a streaming state machine: tags arrive split across tokens (`<`, `think`, `>`)
//! and an SSE client must never see a byte of a withheld section, so text that could
//! still become a tag is held until it cannot. The filter only splits the text; what
//! replaces a section (nothing, or a summary the model writes in a second pass) is the
//! caller's decision.
//!
//! Scope: sections delimited by tags, the convention of reasoning models (DeepSeek-R1,
//! Qwen3, SmolLM3). A template that opens the section in the prompt (the answer starts
//! inside it) is handled by starting the filter inside. Untagged "step by step"
//! answers are not split: there is no reliable boundary to cut at.

/// Opening and closing tags of a reasoning section.
pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// A piece of filtered output, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Text the client may see.
    Text(String),
    /// A reasoning section ended; its text (without tags). Also emitted at
    /// [`ReasoningFilter::finish`] for a section that never closed.
    Section(String),
}

/// What one token's text became.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    pub segments: Vec<Segment>,
    /// The token touched a section, a tag or held-back text: its log-prob entry is not
    /// returned (conservative: a held `<` that turns out to be text loses its entry).
    pub hidden: bool,
}

/// The filter of one choice.
#[derive(Clone, Debug)]
pub struct ReasoningFilter {
    inside: bool,
    /// Text not yet classified (a possible tag prefix).
    held: String,
    /// The current section's text.
    section: String,
}

impl ReasoningFilter {
    /// `starts_inside`: the prompt opened a section the answer continues.
    pub fn new(starts_inside: bool) -> Self {
        Self {
            inside: starts_inside,
            held: String::new(),
            section: String::new(),
        }
    }

    /// Whether a prompt's text leaves a section open (ends with `<think>`, maybe
    /// followed by whitespace).
    pub fn prompt_opens_section(prompt: &str) -> bool {
        prompt.trim_end().ends_with(OPEN)
    }

    pub fn inside(&self) -> bool {
        self.inside
    }

    /// Feed one token's text.
    pub fn push(&mut self, text: &str) -> Filtered {
        let was_inside = self.inside;
        let had_held = !self.held.is_empty();
        self.held.push_str(text);
        let mut out = Filtered::default();
        let mut touched = false;
        loop {
            let tag = if self.inside { CLOSE } else { OPEN };
            if let Some(at) = self.held.find(tag) {
                let before: String = self.held[..at].to_owned();
                self.held.drain(..at + tag.len());
                touched = true;
                if self.inside {
                    self.section.push_str(&before);
                    out.segments
                        .push(Segment::Section(std::mem::take(&mut self.section)));
                } else if !before.is_empty() {
                    push_text(&mut out.segments, before);
                }
                self.inside = !self.inside;
                continue;
            }
            // No whole tag: release everything but a suffix that may start one.
            let keep = longest_tag_prefix_suffix(&self.held, tag);
            let release_to = self.held.len() - keep;
            let released: String = self.held.drain(..release_to).collect();
            if self.inside {
                self.section.push_str(&released);
            } else if !released.is_empty() {
                push_text(&mut out.segments, released);
            }
            break;
        }
        out.hidden = was_inside || self.inside || touched || had_held || !self.held.is_empty();
        out
    }

    /// The end of the answer: held text is released, an unclosed section reported.
    pub fn finish(&mut self) -> Vec<Segment> {
        let held = std::mem::take(&mut self.held);
        if self.inside {
            self.section.push_str(&held);
            self.inside = false;
            vec![Segment::Section(std::mem::take(&mut self.section))]
        } else if held.is_empty() {
            Vec::new()
        } else {
            vec![Segment::Text(held)]
        }
    }
}

fn push_text(segments: &mut Vec<Segment>, text: String) {
    if let Some(Segment::Text(last)) = segments.last_mut() {
        last.push_str(&text);
    } else {
        segments.push(Segment::Text(text));
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn longest_tag_prefix_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && s.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Run pieces through a filter: (visible text, sections).
    fn run(start_inside: bool, pieces: &[&str]) -> (String, Vec<String>, Vec<bool>) {
        let mut f = ReasoningFilter::new(start_inside);
        let mut visible = String::new();
        let mut sections = Vec::new();
        let mut hidden = Vec::new();
        let mut take = |segs: Vec<Segment>| {
            for s in segs {
                match s {
                    Segment::Text(t) => visible.push_str(&t),
                    Segment::Section(r) => sections.push(r),
                }
            }
        };
        for p in pieces {
            let out = f.push(p);
            hidden.push(out.hidden);
            take(out.segments);
        }
        take(f.finish());
        (visible, sections, hidden)
    }

    #[test]
    fn splits_tags_across_tokens() {
        let (v, s, h) = run(
            false,
            &[
                "Sure. ",
                "<",
                "think",
                ">",
                "2+2",
                " is 4",
                "</",
                "think>",
                "\nIt is 4.",
            ],
        );
        assert_eq!(v, "Sure. \nIt is 4.");
        assert_eq!(s, vec!["2+2 is 4"]);
        assert_eq!(
            h,
            vec![false, true, true, true, true, true, true, true, false]
        );
    }

    #[test]
    fn a_lone_angle_bracket_is_text() {
        let (v, s, _) = run(false, &["a <", " b", " <thin", "g>"]);
        assert_eq!(v, "a < b <thing>");
        assert!(s.is_empty());
    }

    #[test]
    fn unclosed_section_and_prompt_opened_section() {
        let (v, s, h) = run(true, &["let me", " see"]);
        assert_eq!(v, "");
        assert_eq!(s, vec!["let me see"]);
        assert!(h.iter().all(|&x| x));
        let (v, s, _) = run(false, &["x<think>never closed"]);
        assert_eq!(v, "x");
        assert_eq!(s, vec!["never closed"]);
    }

    #[test]
    fn prompt_detection() {
        assert!(ReasoningFilter::prompt_opens_section("Q: 2+2?\n<think>\n"));
        assert!(!ReasoningFilter::prompt_opens_section("Q: 2+2?"));
        assert!(!ReasoningFilter::prompt_opens_section(
            "<think>a</think> answer"
        ));
        assert!(ReasoningFilter::prompt_opens_section(
            "<think>a</think> answer <think>"
        ));
    }

    proptest! {
        /// However the text is cut into tokens, the visible text and the sections are
        /// the same as for the whole text at once.
        #[test]
        fn chunking_does_not_matter(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("<think>".to_string()),
                    Just("</think>".to_string()),
                    Just("<".to_string()),
                    "[a-z <>/é]{0,6}",
                ],
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..40, 0..10),
        ) {
            let text: String = parts.concat();
            let whole = run(false, &[text.as_str()]);
            // Cut at char boundaries only (tokens are whole UTF-8 pieces here).
            let mut bounds: Vec<usize> = cuts
                .into_iter()
                .map(|c| c.min(text.len()))
                .filter(|&c| text.is_char_boundary(c))
                .collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let chunked = run(false, &pieces);
            prop_assert_eq!(&whole.0, &chunked.0);
            prop_assert_eq!(&whole.1, &chunked.1);
        }
    }
}
