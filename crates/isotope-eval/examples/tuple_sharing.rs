//! TEMPORARY diagnostic: how much do human texts share scored tuples?
use isotope_engine::{LoadOptions, Model};
use isotope_eval::{default_data_dir, load_human_texts};
use std::collections::{HashMap, HashSet};

fn prf(secret: &[u8; 32], label: &[u8], tokens: &[u32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(&(label.len() as u32).to_le_bytes());
    h.update(label);
    h.update(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn sharing<T: std::hash::Hash + Eq + Clone>(name: &str, per_text: &[HashSet<T>]) {
    let mut count: HashMap<T, u64> = HashMap::new();
    for s in per_text {
        for t in s {
            *count.entry(t.clone()).or_default() += 1;
        }
    }
    let total: u64 = count.values().sum();
    let sq: f64 = count.values().map(|&c| (c * c) as f64).sum();
    let frac = |m: u64| count.values().filter(|&&c| c >= m).sum::<u64>() as f64 / total as f64;
    let mut top: Vec<(&T, &u64)> = count.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    eprintln!("{name}: scored tuples {total}, distinct {}, share in >=2 texts {:.3}, >=10 {:.3}, >=100 {:.3}, >=1000 {:.3}; mean texts sharing a scored tuple {:.1}; top counts {:?}",
        count.len(), frac(2), frac(10), frac(100), frac(1000), sq / total as f64,
        top.iter().take(8).map(|x| *x.1).collect::<Vec<_>>());
}

fn main() {
    let model = Model::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        &LoadOptions {
            vocab_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let texts = load_human_texts(default_data_dir()).unwrap();
    let toks: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenize(&t.text, false, false))
        .collect();
    let h = 4;
    let left: Vec<HashSet<(Vec<u32>, u32)>> = toks
        .iter()
        .map(|t| (h..t.len()).map(|p| (t[p - h..p].to_vec(), t[p])).collect())
        .collect();
    sharing("left/gumbel/synthid/self h=4 (window,token)", &left);
    let uni: Vec<HashSet<u32>> = toks.iter().map(|t| t.iter().copied().collect()).collect();
    sharing("unigram token", &uni);
    let which: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    for i in if which.is_empty() {
        (0..20).collect()
    } else {
        which
    } {
        let secret =
            *blake3::hash(format!("isotope-eval calibration key {i}").as_bytes()).as_bytes();
        let mut cache: HashMap<u32, u64> = HashMap::new();
        let mut hh = |t: u32| {
            *cache.entry(t).or_insert_with(|| {
                u64::from_le_bytes(
                    prf(&secret, b"kgw-min-token", &[t])[..8]
                        .try_into()
                        .unwrap(),
                )
            })
        };
        let mut min_count: HashMap<u32, u64> = HashMap::new();
        let mut positions = 0u64;
        let sets: Vec<HashSet<(u32, u32)>> = toks
            .iter()
            .map(|t| {
                (h..t.len())
                    .map(|p| {
                        let m = t[p - h..p].iter().copied().min_by_key(|&x| hh(x)).unwrap();
                        *min_count.entry(m).or_default() += 1;
                        positions += 1;
                        (m, t[p])
                    })
                    .collect()
            })
            .collect();
        let mut mc: Vec<(u32, u64)> = min_count.into_iter().collect();
        mc.sort_by(|a, b| b.1.cmp(&a.1));
        let top: Vec<String> = mc
            .iter()
            .take(3)
            .map(|(t, c)| {
                format!(
                    "{:?} {:.3}",
                    model.token_text(*t),
                    *c as f64 / positions as f64
                )
            })
            .collect();
        eprint!("key {i}: min-token shares {top:?}  ");
        sharing("min-hash (min token, token)", &sets);
    }
}
