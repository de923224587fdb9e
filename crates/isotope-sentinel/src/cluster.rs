//! Sybil linking: accounts that share a rare client address (or /24 prefix), a rare
//! user agent, reused prompt templates, an embedding region, and that are active in
//! the same ten-minute slots accumulate edge weight; a pair whose weight reaches
//! [`LinkConfig::link_at`] is joined by union-find. A cluster is then scored like one
//! big account, so a harvest split across 20 keys is seen whole.
//!
//! Why "rare": a value shared by many accounts (a corporate NAT, the Chrome user
//! agent, a common follow-up like "make it shorter") says nothing about common
//! ownership, so an index key stops linking once more than `*_cap` accounts used it.
//! Why templates only after reuse: a band key is indexed only when it was already seen
//! in the same account (a template the account itself repeats); that keeps the index
//! proportional to templated traffic instead of to all prompts. Links are never
//! undone (union-find cannot split), so caps err on the side of not linking.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::sketch::hash_bytes;

/// Weights and caps of the linker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkConfig {
    /// Accounts per exact client address before it counts as shared infrastructure.
    pub addr_cap: usize,
    /// Accounts per /24 (IPv4) or /48 (IPv6) prefix before it stops linking.
    pub prefix_cap: usize,
    /// Accounts per user agent before it stops linking.
    pub ua_cap: usize,
    /// Accounts per reused template band before it stops linking.
    pub band_cap: usize,
    /// Accounts per centroid cell before it stops linking.
    pub cell_cap: usize,
    /// Weight of a shared exact address.
    pub w_addr: f32,
    /// Weight of a shared prefix.
    pub w_prefix: f32,
    /// Weight of a shared user agent.
    pub w_ua: f32,
    /// Weight per shared reused template band (at most four count).
    pub w_template: f32,
    /// Weight of centroids with cosine above `centroid_cos`.
    pub w_centroid: f32,
    /// Centroid cosine that counts as the same embedding region.
    pub centroid_cos: f32,
    /// Weight times the Jaccard overlap of active ten-minute slots.
    pub w_timing: f32,
    /// Total weight that joins two accounts.
    pub link_at: f32,
    /// Index entries (all kinds) before the indexes are cleared and rebuilt from new
    /// traffic: the memory bound of the linker.
    pub max_index_entries: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            addr_cap: 8,
            prefix_cap: 24,
            ua_cap: 24,
            band_cap: 32,
            cell_cap: 24,
            w_addr: 0.5,
            w_prefix: 0.25,
            w_ua: 0.2,
            w_template: 0.15,
            w_centroid: 0.2,
            centroid_cos: 0.97,
            w_timing: 0.4,
            link_at: 1.0,
            max_index_entries: 4_000_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Pair {
    addr: bool,
    prefix: bool,
    ua: bool,
    templates: u8,
    centroid: bool,
    timing: f32,
}

impl Pair {
    fn weight(&self, c: &LinkConfig) -> f32 {
        c.w_addr * self.addr as u8 as f32
            + c.w_prefix * self.prefix as u8 as f32
            + c.w_ua * self.ua as u8 as f32
            + c.w_template * self.templates.min(4) as f32
            + c.w_centroid * self.centroid as u8 as f32
            + c.w_timing * self.timing
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Addr,
    Prefix,
    Ua,
    Template,
    Centroid,
}

/// The linker: bounded indexes, pair weights and a union-find over accounts.
#[derive(Default)]
pub struct Linker {
    cfg: LinkConfig,
    index: HashMap<(u8, u64), Vec<u32>>,
    entries: usize,
    pairs: HashMap<(u32, u32), Pair>,
    parent: Vec<u32>,
    members: HashMap<u32, Vec<u32>>,
}

/// Members kept per cluster (pooling more would make scoring a giant cluster slow).
pub const MAX_MEMBERS: usize = 256;

impl Linker {
    /// A linker with these weights.
    pub fn new(cfg: LinkConfig) -> Self {
        Linker {
            cfg,
            ..Default::default()
        }
    }

    /// Registers account slot `a` (slots are dense indexes given by the caller).
    pub fn ensure(&mut self, a: u32) {
        while self.parent.len() <= a as usize {
            let i = self.parent.len() as u32;
            self.parent.push(i);
            self.members.insert(i, vec![i]);
        }
    }

    /// Root of `a`'s cluster.
    pub fn find(&mut self, a: u32) -> u32 {
        let mut r = a;
        while self.parent[r as usize] != r {
            r = self.parent[r as usize];
        }
        let mut x = a;
        while self.parent[x as usize] != r {
            let next = self.parent[x as usize];
            self.parent[x as usize] = r;
            x = next;
        }
        r
    }

    /// Members of `a`'s cluster (at most [`MAX_MEMBERS`]).
    pub fn members(&mut self, a: u32) -> &[u32] {
        let r = self.find(a);
        &self.members[&r]
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let (keep, gone) = if self.members[&ra].len() >= self.members[&rb].len() {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[gone as usize] = keep;
        let moved = self.members.remove(&gone).unwrap_or_default();
        let m = self.members.get_mut(&keep).expect("root has members");
        for x in moved {
            if m.len() < MAX_MEMBERS {
                m.push(x);
            }
        }
    }

    /// Adds `a` under index key `(kind, key)`; every other account already there (while
    /// the key is still rare) gets the kind's evidence. Returns the partners touched.
    fn index(&mut self, kind: Kind, key: u64, a: u32) -> Vec<u32> {
        let cap = match kind {
            Kind::Addr => self.cfg.addr_cap,
            Kind::Prefix => self.cfg.prefix_cap,
            Kind::Ua => self.cfg.ua_cap,
            Kind::Template => self.cfg.band_cap,
            Kind::Centroid => self.cfg.cell_cap,
        };
        if self.entries >= self.cfg.max_index_entries {
            self.index.clear();
            self.entries = 0;
        }
        let list = self.index.entry((kind as u8, key)).or_default();
        if list.contains(&a) || list.len() > cap {
            return Vec::new();
        }
        list.push(a);
        self.entries += 1;
        if list.len() > cap {
            // just became common: stop linking through it
            return Vec::new();
        }
        let partners: Vec<u32> = list.iter().copied().filter(|&b| b != a).collect();
        for &b in &partners {
            let p = self.pairs.entry((a.min(b), a.max(b))).or_default();
            match kind {
                Kind::Addr => p.addr = true,
                Kind::Prefix => p.prefix = true,
                Kind::Ua => p.ua = true,
                Kind::Template => p.templates = p.templates.saturating_add(1),
                Kind::Centroid => p.centroid = true,
            }
        }
        partners
    }

    /// Folds one event's linking evidence in. `reused_bands` are the band keys of this
    /// prompt that the account had already used; `activity` gives each account's
    /// (slot bitmap, newest slot) for the timing overlap.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        a: u32,
        client_addr: Option<&str>,
        user_agent: Option<&str>,
        reused_bands: &[u32],
        activity: &dyn Fn(u32) -> (u64, i64),
    ) {
        self.ensure(a);
        let mut touched = Vec::new();
        if let Some(addr) = client_addr.filter(|s| !s.is_empty()) {
            let host = strip_port(addr);
            touched.extend(self.index(Kind::Addr, hash_bytes(host.as_bytes(), 21), a));
            if let Some(p) = prefix(host) {
                touched.extend(self.index(Kind::Prefix, hash_bytes(p.as_bytes(), 22), a));
            }
        }
        if let Some(ua) = user_agent.filter(|s| !s.is_empty()) {
            touched.extend(self.index(Kind::Ua, hash_bytes(ua.as_bytes(), 23), a));
        }
        for &b in reused_bands {
            touched.extend(self.index(Kind::Template, b as u64, a));
        }
        self.relink(a, touched, activity);
    }

    /// Indexes an account's embedding centroid cell; partners whose centroid cosine
    /// with `a` exceeds the threshold get the centroid evidence.
    pub fn observe_centroid(
        &mut self,
        a: u32,
        cell: usize,
        cosine_with: &dyn Fn(u32) -> f32,
        activity: &dyn Fn(u32) -> (u64, i64),
    ) {
        self.ensure(a);
        let partners = self.index(Kind::Centroid, cell as u64, a);
        let mut close = Vec::new();
        for b in partners {
            let p = self.pairs.get_mut(&(a.min(b), a.max(b))).expect("indexed");
            if cosine_with(b) < self.cfg.centroid_cos {
                p.centroid = false;
            } else {
                close.push(b);
            }
        }
        self.relink(a, close, activity);
    }

    fn relink(&mut self, a: u32, mut touched: Vec<u32>, activity: &dyn Fn(u32) -> (u64, i64)) {
        touched.sort_unstable();
        touched.dedup();
        let (act_a, slot_a) = activity(a);
        for b in touched {
            let (act_b, slot_b) = activity(b);
            let key = (a.min(b), a.max(b));
            let p = self.pairs.get_mut(&key).expect("touched pairs exist");
            p.timing = timing_overlap(act_a, slot_a, act_b, slot_b);
            if p.weight(&self.cfg) >= self.cfg.link_at {
                self.union(a, b);
            }
        }
    }

    /// Approximate heap bytes of the indexes, pairs and union-find.
    pub fn bytes(&self) -> usize {
        self.index.len() * 48
            + self.entries * 4
            + self.pairs.len() * 40
            + self.parent.len() * 4
            + self
                .members
                .values()
                .map(|m| 32 + m.capacity() * 4)
                .sum::<usize>()
    }
}

/// Jaccard overlap of two activity bitmaps aligned on their newest slots; 0 unless both
/// were active in at least four slots (two sessions at the same time prove nothing).
pub fn timing_overlap(a: u64, slot_a: i64, b: u64, slot_b: i64) -> f32 {
    let (a, b) = if slot_a >= slot_b {
        (a, shift(b, slot_a - slot_b))
    } else {
        (shift(a, slot_b - slot_a), b)
    };
    if a.count_ones() < 4 || b.count_ones() < 4 {
        return 0.0;
    }
    (a & b).count_ones() as f32 / (a | b).count_ones() as f32
}

fn shift(x: u64, by: i64) -> u64 {
    if by >= 64 {
        0
    } else {
        x << by
    }
}

fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => addr,
    }
}

/// The /24 of an IPv4 address or the /48 of an IPv6 one.
fn prefix(host: &str) -> Option<String> {
    if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
        let o = v4.octets();
        return Some(format!("{}.{}.{}.0/24", o[0], o[1], o[2]));
    }
    if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        let s = v6.segments();
        return Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(_: u32) -> (u64, i64) {
        (0, 0)
    }

    #[test]
    fn address_plus_agent_plus_prefix_links_but_a_common_address_does_not() {
        let mut l = Linker::new(LinkConfig::default());
        // two accounts on one rare address, one rare agent, same /24: 0.5 + 0.25 + 0.2
        l.observe(0, Some("10.1.2.3:5555"), Some("harvester/1.0"), &[], &idle);
        l.observe(1, Some("10.1.2.3:6666"), Some("harvester/1.0"), &[], &idle);
        assert_ne!(l.find(0), l.find(1));
        // plus one reused template: over the line
        l.observe(0, None, None, &[42], &idle);
        l.observe(1, None, None, &[42], &idle);
        assert_eq!(l.find(0), l.find(1));
        assert_eq!(l.members(1).len(), 2);

        // a NAT shared by 30 accounts with the same agent never joins them
        let mut l = Linker::new(LinkConfig::default());
        for a in 0..30 {
            l.observe(a, Some("192.168.0.1"), Some("Mozilla/5.0"), &[], &idle);
        }
        for a in 0..30 {
            l.observe(a, None, None, &[7], &idle);
        }
        let roots: std::collections::HashSet<u32> = (0..30).map(|a| l.find(a)).collect();
        assert!(roots.len() > 20, "{}", roots.len());
    }

    #[test]
    fn timing_overlap_aligns_slots() {
        let a = 0b1111_0000u64;
        assert_eq!(timing_overlap(a, 10, a, 10), 1.0);
        assert_eq!(timing_overlap(a, 10, a >> 2, 8), 1.0);
        assert_eq!(timing_overlap(0b1111, 10, 0b1111_0000, 10), 0.0);
        assert_eq!(timing_overlap(0b11, 10, 0b11, 10), 0.0);
    }

    #[test]
    fn addresses_lose_their_port() {
        assert_eq!(strip_port("1.2.3.4:80"), "1.2.3.4");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(prefix("1.2.3.4").as_deref(), Some("1.2.3.0/24"));
    }
}
