//! Pure measurements for `isotope distill eval`: the KL over a teacher's top-k plus a
//! tail bucket, argmax agreement and GSM8K-style final answers.

use isotope_sampling::TokenId;

/// Natural-log softmax of one row of logits, in f64.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Index of the largest logit (the first on ties).
pub fn argmax(row: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as TokenId
}

/// KL(teacher ‖ student) over the teacher's top-k plus one tail bucket, in nats — the
/// same definition as the `kl` training loss (`loss.rs`): the teacher's distribution is
/// its top-k probabilities `p_i` and the tail `1 − Σ p_i`; the student's is its
/// probabilities `q_i` of the same ids and its tail `1 − Σ q_i`. Probabilities of the
/// tail are floored at [`crate::LOG_FLOOR`].
pub fn kl_top_tail(teacher: &[(TokenId, f32)], student_logprobs: &[f64]) -> f64 {
    let floor = crate::LOG_FLOOR;
    let mut kl = 0.0;
    let (mut p_sum, mut q_sum) = (0.0, 0.0);
    for &(id, lp) in teacher {
        let p = (lp as f64).exp();
        let lq = student_logprobs[id as usize];
        kl += p * (lp as f64 - lq);
        p_sum += p;
        q_sum += lq.exp();
    }
    let p_tail = (1.0 - p_sum).max(0.0);
    if p_tail > 0.0 {
        let q_tail = (1.0 - q_sum).max(floor);
        kl += p_tail * (p_tail.max(floor).ln() - q_tail.ln());
    }
    kl.max(0.0)
}

/// The final answer of a GSM8K-style solution: the number after the last `####`, else
/// the last number in the text; commas and a trailing `.` dropped, `12.0` read as `12`.
pub fn final_answer(text: &str) -> Option<String> {
    let tail = match text.rfind("####") {
        Some(i) => first_number(&text[i + 4..]),
        None => None,
    };
    tail.or_else(|| numbers(text).pop()).map(|n| normalize(&n))
}

fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let digit_follows = chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c.is_ascii_digit()
            || (!cur.is_empty() && (c == '.' || c == ',') && digit_follows)
            || (cur.is_empty() && c == '-' && digit_follows)
        {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn first_number(text: &str) -> Option<String> {
    numbers(text).into_iter().next()
}

fn normalize(n: &str) -> String {
    let s: String = n.chars().filter(|&c| c != ',').collect();
    match s.parse::<f64>() {
        Ok(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
        Ok(v) => format!("{v}"),
        Err(_) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            final_answer("so 9 * 2 = 18\n#### 18").as_deref(),
            Some("18")
        );
        assert_eq!(final_answer("#### 1,234.").as_deref(), Some("1234"));
        assert_eq!(
            final_answer("It costs $3.50, then 4 more: 7.0").as_deref(),
            Some("7")
        );
        assert_eq!(final_answer("the answer is -5.").as_deref(), Some("-5"));
        assert_eq!(final_answer("no numbers"), None);
    }

    #[test]
    fn kl_matches_definition() {
        // Student uniform over 4 tokens; teacher top-2 {0: 0.5, 1: 0.25}, tail 0.25.
        let student = vec![(0.25f64).ln(); 4];
        let teacher = [(0, (0.5f32).ln()), (1, (0.25f32).ln())];
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.25 * 0.0 + 0.25 * (0.25f64 / 0.5).ln();
        assert!((kl_top_tail(&teacher, &student) - want).abs() < 1e-6);
        // Identical distributions: zero.
        let same = [(0, (0.25f32).ln()), (1, (0.25f32).ln())];
        assert!(kl_top_tail(&same, &student).abs() < 1e-6);
        let lp = log_softmax_row(&[1.0, 1.0, 1.0, 1.0]);
        assert!((lp[0] - (0.25f64).ln()).abs() < 1e-12);
        assert_eq!(argmax(&[0.0, 2.0, 2.0]), 1);
    }
}
