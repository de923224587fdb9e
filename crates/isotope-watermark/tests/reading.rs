//! The white-box reading mode and the black-box prompt-window seeding: exact under
//! the null (a suspect that does not depend on the key, even when it reads
//! watermarked text or continues watermarked prompts), and powerful against a suspect
//! that absorbed the watermark. Synthetic language model, real sampler and hook.

use std::sync::Arc;

use isotope_sampling::{Sampler, SamplingParams, StepContext};
use isotope_watermark::{
    stats, Detector, ExcludedTokens, PairOutcome, Scheme, Tally, WatermarkHook, WatermarkKey,
    MASS_MIN_PROB, NO_PREDICTION,
};

const VOCAB: usize = 2000;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A deterministic "language model": logits depend on the last two tokens, with a
/// heavy head (entropy of a few nats) like a real LM's.
fn logits(context: &[u32]) -> Vec<f32> {
    let n = context.len();
    let a = if n >= 1 { context[n - 1] } else { 7 } as u64;
    let b = if n >= 2 { context[n - 2] } else { 11 } as u64;
    let seed = mix(a * 1_000_003 + b);
    (0..VOCAB as u64)
        .map(|i| {
            let r = mix(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let u = (r >> 11) as f32 / (1u64 << 53) as f32;
            // Zipf-like head: token rank given by the hash.
            -1.2 * ((r % VOCAB as u64) as f32 + 1.0).ln() + u
        })
        .collect()
}

fn no_exclusions() -> ExcludedTokens {
    vec![false; VOCAB].into()
}

fn key(i: u8) -> Arc<WatermarkKey> {
    Arc::new(WatermarkKey::from_bytes([i; 32]))
}

fn generate(
    n: usize,
    params: SamplingParams,
    choice: u64,
    hook: Option<WatermarkHook>,
    prompt: &[u32],
) -> Vec<u32> {
    let mut s = Sampler::new(params, choice);
    if let Some(h) = hook {
        s = s.with_hook(Box::new(h));
    }
    let mut generated = Vec::new();
    for _ in 0..n {
        let mut ctx_tokens = prompt.to_vec();
        ctx_tokens.extend(&generated);
        let l = logits(&ctx_tokens);
        let ctx = StepContext {
            prompt,
            generated: &generated,
        };
        let t = s.sample(&l, &ctx, 0).token;
        generated.push(t);
    }
    generated
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed,
        ..SamplingParams::default()
    }
}

fn scheme() -> Scheme {
    "kgw:gamma=0.25,delta=2,h=1".parse().unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Watermarked texts under `k` (KGW h=1), `texts` of `len` tokens each.
fn marked(k: &Arc<WatermarkKey>, texts: usize, len: usize) -> Vec<Vec<u32>> {
    (0..texts)
        .map(|i| {
            let hook = WatermarkHook::new(k.clone(), &scheme(), no_exclusions(), false);
            generate(len, sampled(i as u64), 0, Some(hook), &[i as u32 + 1])
        })
        .collect()
}

/// Top-1 predictions of a suspect after every prefix of `tokens`.
fn predict(tokens: &[u32], suspect: impl Fn(&[u32]) -> u32) -> Vec<u32> {
    (1..=tokens.len()).map(|i| suspect(&tokens[..i])).collect()
}

fn reading_p(
    k: &Arc<WatermarkKey>,
    texts: &[Vec<u32>],
    suspect: impl Fn(&[u32]) -> u32,
) -> (f64, u64) {
    let d = Detector::new(k.clone(), scheme(), no_exclusions());
    let mut t = Tally::default();
    for text in texts {
        let preds = predict(text, &suspect);
        d.tally_reading(&mut t, text, &preds, |_, _, _, _| {});
    }
    let r = d.finish(&t);
    (r.p_value, r.scored_tokens)
}

fn fpr_ok(p: &[f64], alpha: f64) -> bool {
    let hits = p.iter().filter(|&&x| x <= alpha).count() as u64;
    // Valid unless even the 99% Clopper–Pearson lower bound is above α.
    let (lo, _) = stats::clopper_pearson(hits, p.len() as u64, 0.01);
    eprintln!("FPR@{alpha}: {hits}/{} (99% CP lower {lo:.4})", p.len());
    lo <= alpha
}

#[test]
fn reading_mode_is_exact_for_a_clean_suspect_reading_watermarked_text() {
    // The clean suspect is the very model that generated the text, without the
    // watermark: its top-1 is often the token the watermark pushed away from or
    // towards, yet under the one-tuple-per-window rule its p-values are uniform.
    let mut p = Vec::new();
    for i in 0..150u8 {
        let k = key(i);
        let texts = marked(&k, 3, 120);
        let (pv, n) = reading_p(&k, &texts, |ctx| argmax(&logits(ctx)));
        assert!(n > 100, "{n} tuples");
        p.push(pv);
    }
    assert!(fpr_ok(&p, 0.05));
    assert!(fpr_ok(&p, 0.01));
    // KGW p-values are discrete: compare with U(0,1) only through the FPR bounds
    // above and a loose KS check on the lower tail (never below the nominal level).
    let (d, ks_p) = stats::ks_uniform(&p);
    eprintln!("KS D={d:.3} p={ks_p:.3}");
}

#[test]
fn reading_mode_flags_a_suspect_that_absorbed_the_watermark() {
    let k = key(200);
    let texts = marked(&k, 4, 150);
    let d = Detector::new(k.clone(), scheme(), no_exclusions());
    // A suspect whose own distribution carries the green bias (what a student trained
    // on the text learns): argmax of the watermarked logits.
    let green_bias = |ctx: &[u32]| {
        let mut l = logits(ctx);
        let w = &ctx[ctx.len() - 1..];
        for (t, x) in l.iter_mut().enumerate() {
            let probe = [w[0], t as u32];
            if d.detect(&probe).statistic > 0.5 {
                *x += 2.0;
            }
        }
        argmax(&l)
    };
    let (p, n) = reading_p(&k, &texts, green_bias);
    eprintln!("radioactive suspect: p={p:.3e} over {n} windows");
    assert!(p < 1e-6, "p = {p}");
    // Another key does not see it.
    let (p_other, _) = reading_p(&key(201), &texts, green_bias);
    assert!(p_other > 1e-3, "p under another key = {p_other}");
}

/// A suspect's candidates after `ctx` as the readers list them: every token with
/// probability at least [`MASS_MIN_PROB`], most likely first, natural-log
/// probabilities.
fn candidates(l: &[f32]) -> Vec<(u32, f32)> {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z = l.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
    let mut c = (0..l.len() as u32)
        .map(|t| (t, l[t as usize] - z))
        .filter(|&(_, lp)| f64::from(lp).exp() >= MASS_MIN_PROB)
        .collect::<Vec<_>>();
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    c
}

fn mass_p(
    k: &Arc<WatermarkKey>,
    texts: &[Vec<u32>],
    suspect: impl Fn(&[u32]) -> Vec<f32>,
) -> (f64, u64) {
    let d = Detector::new(k.clone(), scheme(), no_exclusions());
    assert!(scheme().supports_mass_reading());
    let mut t = Tally::default();
    for text in texts {
        let top: Vec<_> = (1..=text.len())
            .map(|i| candidates(&suspect(&text[..i])))
            .collect();
        d.tally_reading_mass(&mut t, text, &top, |_, _, _, _, _| {});
    }
    let r = d.finish(&t);
    (r.p_value, r.scored_tokens)
}

/// The synthetic model with `bias` added to the green logits of key `k` after the
/// last token: what a student that absorbed the watermark to some degree predicts.
fn tilted(k: &Arc<WatermarkKey>, bias: f32) -> impl Fn(&[u32]) -> Vec<f32> {
    let d = Detector::new(k.clone(), scheme(), no_exclusions());
    move |ctx: &[u32]| {
        let mut l = logits(ctx);
        let w = ctx[ctx.len() - 1];
        for (t, x) in l.iter_mut().enumerate() {
            if d.detect(&[w, t as u32]).statistic > 0.5 {
                *x += bias;
            }
        }
        l
    }
}

#[test]
fn mass_reading_is_exact_for_a_clean_suspect_reading_watermarked_text() {
    // As for the top-1 reading: the clean suspect is the unwatermarked generator
    // itself, so its mass sits on the very tokens the watermark moved.
    let mut p = Vec::new();
    for i in 0..150u8 {
        let k = key(i);
        let texts = marked(&k, 3, 120);
        let (pv, n) = mass_p(&k, &texts, logits);
        assert!(n > 100, "{n} tuples");
        p.push(pv);
    }
    assert!(fpr_ok(&p, 0.05));
    assert!(fpr_ok(&p, 0.01));
    assert!(fpr_ok(&p, 0.1));
    let (d, ks_p) = stats::ks_uniform(&p);
    eprintln!("mass reading, clean suspect: KS D={d:.3} p={ks_p:.3}");
}

#[test]
fn mass_reading_sees_a_faint_watermark_that_top1_misses() {
    // A suspect that absorbed a little of the watermark (bias 0.2 on green logits,
    // a tenth of the teacher's δ): its top-1 rarely changes, its mass does.
    let k = key(210);
    let texts = marked(&k, 4, 150);
    let suspect = tilted(&k, 0.2);
    let (p_mass, n) = mass_p(&k, &texts, &suspect);
    let (p_top1, n1) = reading_p(&k, &texts, |ctx| argmax(&suspect(ctx)));
    eprintln!("faint watermark: mass p={p_mass:.3e} ({n} pairs), top-1 p={p_top1:.3e} ({n1})");
    assert!(p_mass < 1e-4, "mass p = {p_mass}");
    assert!(p_mass < p_top1 * 1e-2, "mass {p_mass} vs top-1 {p_top1}");
    // Another key does not see it.
    let (p_other, _) = mass_p(&key(211), &texts, &suspect);
    assert!(p_other > 1e-3, "p under another key = {p_other}");
}

#[test]
fn mass_reading_spends_each_window_once_and_weighs_by_probability() {
    let k = key(212);
    let d = Detector::new(k.clone(), scheme(), no_exclusions());
    let mut t = Tally::default();
    let lp = |q: f32| q.ln();
    // Position 1 reads window [5] with no candidates listed (spent all the same);
    // position 2 reads window [6]: weights 32 (q ½), 16 (¼), 0 (1/256: not scored), and
    // a repeated candidate and NO_PREDICTION are not scored either; position 3's
    // window [5] is spent.
    let top = vec![
        vec![],
        vec![
            (3, lp(0.5)),
            (4, lp(0.25)),
            (3, lp(0.5)),
            (9, lp(1.0 / 256.0)),
            (NO_PREDICTION, 0.0),
        ],
        vec![(3, lp(0.9))],
    ];
    let mut seen = Vec::new();
    let mut hits = 0.0;
    d.tally_reading_mass(&mut t, &[5, 6, 5], &top, |pos, w, c, weight, o| {
        if let PairOutcome::Scored(g) = o {
            hits += g * f64::from(weight);
        }
        seen.push((
            pos,
            w.to_vec(),
            c,
            weight,
            matches!(o, PairOutcome::Scored(_)),
        ))
    });
    let scored: Vec<_> = seen
        .iter()
        .filter(|s| s.4)
        .map(|s| (s.0, s.2, s.3))
        .collect();
    assert_eq!(scored, vec![(2, 3, 32), (2, 4, 16)]);
    assert_eq!(t.scored(), 2);
    // The weighted share is the green probability mass over the scored weight.
    let w = d.finish(&t).weighted.expect("a mass reading is weighted");
    assert_eq!(w.observed as f64, hits);
    assert_eq!(w.share(), hits / 48.0);
    assert_eq!(isotope_watermark::mass_weight(lp(1.0)), 64);
    assert_eq!(isotope_watermark::mass_weight(lp(1.0 / 160.0)), 0);
    assert_eq!(isotope_watermark::mass_weight(lp(1.0 / 100.0)), 1);
    assert_eq!(isotope_watermark::mass_weight(f32::NEG_INFINITY), 0);
    // The top-1 counts at least 1 however unsure the suspect is.
    let mut t = Tally::default();
    let flat = vec![vec![], vec![(7, lp(1.0 / 500.0)), (8, lp(1.0 / 600.0))]];
    let mut weights = Vec::new();
    d.tally_reading_mass(&mut t, &[40, 41], &flat, |_, _, c, w, o| {
        if matches!(o, PairOutcome::Scored(_)) {
            weights.push((c, w));
        }
    });
    assert_eq!(weights, [(7, 1)]);
    // Not for schemes without a window-seeded green list.
    for s in [
        "kgw:h=1,seeding=self",
        "unigram",
        "gumbel:h=1",
        "synthid:h=1",
    ] {
        assert!(!s.parse::<Scheme>().unwrap().supports_mass_reading(), "{s}");
    }
}

#[test]
fn tally_pair_scores_each_window_once_and_reports_why_not() {
    let k = key(3);
    // token 10 is a control token
    let mut excluded = vec![false; VOCAB];
    excluded[10] = true;
    let d = Detector::new(k, scheme(), excluded.into());
    let mut t = Tally::default();
    assert!(matches!(
        d.tally_pair(&mut t, &[5], 9),
        PairOutcome::Scored(_)
    ));
    assert_eq!(d.tally_pair(&mut t, &[5], 11), PairOutcome::RepeatedWindow);
    // a window read but not scored is spent all the same
    assert_eq!(d.tally_pair(&mut t, &[6], 10), PairOutcome::Control);
    assert_eq!(d.tally_pair(&mut t, &[6], 11), PairOutcome::RepeatedWindow);
    // an unknown prediction spends its window too
    assert_eq!(
        d.tally_pair(&mut t, &[7], NO_PREDICTION),
        PairOutcome::NoPrediction
    );
    assert_eq!(d.tally_pair(&mut t, &[7], 9), PairOutcome::RepeatedWindow);
    assert_eq!(t.scored(), 1);
}

/// A clean model that quotes a watermarked prompt and then continues it greedily.
fn quoting_continuation(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = prompt.to_vec();
    for _ in 0..n {
        out.push(argmax(&logits(&out)));
    }
    out
}

#[test]
fn prompt_windows_seed_the_dedup_set_so_a_clean_continuation_is_not_flagged() {
    let mut seeded = Vec::new();
    let mut unseeded_hits = 0;
    for i in 0..150u8 {
        let k = key(i);
        let d = Detector::new(k.clone(), scheme(), no_exclusions());
        let prompt = &marked(&k, 1, 80)[0];
        let output = quoting_continuation(prompt, 40);
        let mut t = Tally::default();
        d.tally(&mut t, &output);
        if d.finish(&t).p_value < 0.01 {
            unseeded_hits += 1;
        }
        let mut t = Tally::default();
        t.exclude_windows(&d, prompt);
        d.tally(&mut t, &output);
        let r = d.finish(&t);
        assert!(r.scored_tokens <= 40, "quoted windows are not scored");
        seeded.push(r.p_value);
    }
    eprintln!("without prompt seeding {unseeded_hits}/150 clean continuations flagged at 0.01");
    // The negative control: without seeding the quoted prompt makes the clean model
    // look radioactive.
    assert!(unseeded_hits > 100, "{unseeded_hits}");
    assert!(fpr_ok(&seeded, 0.05));
    assert!(fpr_ok(&seeded, 0.01));
}
