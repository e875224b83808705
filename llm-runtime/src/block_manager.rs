//! The paged KV block manager (vLLM's design).
//!
//! The pool has a fixed number of blocks of `block_size` positions. Each sequence owns a
//! block table; position `p` lives in block `table[p / block_size]` at offset
//! `p % block_size`. Blocks are reference counted so sequences can share them (forks share
//! everything; prefix caching shares full blocks with equal content), and a shared block is
//! copied before it is written (copy-on-write).
//!
//! Prefix caching: when a block fills up, its key is a hash of its tokens and of the key of
//! the block before it (so the key stands for the whole prefix); a later sequence whose
//! prompt starts with the same prefix reuses those blocks instead of computing them. A cached
//! block nobody references is kept (evictable) until a new block is needed and no free one
//! is left; evictable blocks go least recently used first. When even eviction cannot supply
//! a block, the caller preempts a sequence (its blocks are released and it is recomputed
//! later).
//!
//! A model with a sliding window never reads a position again once it has slid out of
//! every later query's window: [`BlockManager::release_before`] releases the blocks that
//! hold only such positions, so that a long sequence holds about a window of blocks.
//!
//! Invariants (checked by [`BlockManager::check`] and property tests): every block is
//! exactly one of free, referenced, or cached-and-evictable; each block's reference count
//! equals the number of (unreleased) table entries pointing at it; no block is handed out
//! twice.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
};

/// A physical block index.
pub type BlockId = u32;

/// A sequence id.
pub type SeqId = u64;

/// The pool has no block left, even after evicting cached ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks;

impl std::fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the KV cache has no free block")
    }
}

impl std::error::Error for OutOfBlocks {}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// The prefix key, for a full block registered in the prefix cache.
    key: Option<u64>,
    /// When the block was last released (for LRU eviction).
    last_use: u64,
}

#[derive(Debug, Clone)]
struct Sequence {
    table: Vec<BlockId>,
    /// Leading table entries released ([`BlockManager::release_before`]): their ids are
    /// stale and count no reference.
    released: usize,
    tokens: Vec<u32>,
    /// The prefix key of each full block, in order (whether or not that block is the one
    /// registered in the cache under the key).
    keys: Vec<u64>,
}

/// Where a new token's key and value go, and a block copy to do first (copy-on-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Flat slot index: `block * block_size + offset`.
    pub slot: usize,
    /// `(from, to)`: copy block `from` to block `to` before writing.
    pub copy: Option<(BlockId, BlockId)>,
}

/// The block manager.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    cache: HashMap<u64, BlockId>,
    evictable: BTreeMap<(u64, BlockId), ()>,
    seqs: HashMap<SeqId, Sequence>,
    clock: u64,
}

/// The prefix key of a full block with `tokens` after a prefix with key `parent`.
fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` positions.
    pub fn new(num_blocks: usize, block_size: usize) -> BlockManager {
        BlockManager {
            block_size: block_size.max(1),
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            cache: HashMap::new(),
            evictable: BTreeMap::new(),
            seqs: HashMap::new(),
            clock: 0,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by some sequence (every block is free, evictable or referenced).
    pub fn used(&self) -> usize {
        self.blocks.len() - self.available()
    }

    /// Positions held by all sequences (shared blocks count once per sequence; released
    /// blocks not at all).
    pub fn tokens_held(&self) -> usize {
        self.seqs
            .values()
            .map(|s| s.tokens.len() - s.released * self.block_size)
            .sum()
    }

    /// The block table of `seq`. Entries that [`release_before`](Self::release_before)
    /// released keep their old ids, which another sequence may hold by now: attention
    /// under the window never reads them, and they stay valid indices into the pool.
    pub fn table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// Positions held by `seq`.
    pub fn len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.tokens.len())
    }

    /// Whether `seq` is known.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    fn take_block(&mut self) -> Result<BlockId, OutOfBlocks> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (&(_, id), _) = self.evictable.iter().next().ok_or(OutOfBlocks)?;
                self.evictable
                    .remove(&(self.blocks[id as usize].last_use, id));
                if let Some(key) = self.blocks[id as usize].key.take() {
                    self.cache.remove(&key);
                }
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Ok(id)
    }

    fn retain(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            self.evictable.remove(&(b.last_use, id));
        }
        b.refs += 1;
    }

    fn release(&mut self, id: BlockId) {
        self.clock += 1;
        let b = &mut self.blocks[id as usize];
        b.refs -= 1;
        if b.refs == 0 {
            b.last_use = self.clock;
            if b.key.is_some() {
                self.evictable.insert((b.last_use, id), ());
            } else {
                self.free.push(id);
            }
        }
    }

    /// Computes the key of the full block at table index `i` of `seq` (the next one without
    /// a key) and registers the block in the prefix cache unless the key is already there.
    fn register_full_block(&mut self, seq: SeqId, i: usize) {
        let s = &self.seqs[&seq];
        debug_assert_eq!(s.keys.len(), i, "keys are computed block by block");
        let parent = if i == 0 { 0 } else { s.keys[i - 1] };
        let key = block_key(
            parent,
            &s.tokens[i * self.block_size..(i + 1) * self.block_size],
        );
        let id = s.table[i];
        if self.blocks[id as usize].key.is_none() && !self.cache.contains_key(&key) {
            self.blocks[id as usize].key = Some(key);
            self.cache.insert(key, id);
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.keys.push(key);
        }
    }

    /// Admits a new sequence with `prompt`, reusing cached blocks for the longest cached
    /// prefix of full blocks. Returns how many leading positions already hold their keys
    /// and values. On failure nothing changes.
    ///
    /// # Panics
    ///
    /// If `seq` is already admitted (a caller bug, like the unknown sequences that
    /// [`append`](Self::append) and [`fork`](Self::fork) panic on).
    pub fn admit(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize, OutOfBlocks> {
        assert!(
            !self.seqs.contains_key(&seq),
            "sequence {seq} is already admitted"
        );
        let bs = self.block_size;
        let mut table = Vec::new();
        let mut keys = Vec::new();
        let mut parent = 0;
        // A cached prefix never covers the last prompt position: its logits must be computed.
        let full = prompt.len().saturating_sub(1) / bs;
        for i in 0..full {
            let key = block_key(parent, &prompt[i * bs..(i + 1) * bs]);
            let Some(&id) = self.cache.get(&key) else {
                break;
            };
            self.retain(id);
            table.push(id);
            keys.push(key);
            parent = key;
        }
        let cached = table.len() * bs;
        let needed = prompt.len().div_ceil(bs) - table.len();
        if needed > self.available() {
            for id in table {
                self.release(id);
            }
            return Err(OutOfBlocks);
        }
        for _ in 0..needed {
            table.push(self.take_block()?);
        }
        self.seqs.insert(
            seq,
            Sequence {
                table,
                released: 0,
                tokens: prompt.to_vec(),
                keys,
            },
        );
        for i in cached / bs..prompt.len() / bs {
            self.register_full_block(seq, i);
        }
        Ok(cached)
    }

    /// Reserves the slot of `seq`'s next position (for `token`), copying a shared last
    /// block first.
    pub fn append(&mut self, seq: SeqId, token: u32) -> Result<Slot, OutOfBlocks> {
        let bs = self.block_size;
        let len = self.seqs[&seq].tokens.len();
        let mut copy = None;
        if len.is_multiple_of(bs) {
            let id = self.take_block()?;
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.table.push(id);
            }
        } else {
            let last = *self.seqs[&seq].table.last().unwrap_or(&0);
            if self.blocks[last as usize].refs > 1 {
                let id = self.take_block()?;
                self.release(last);
                if let Some(s) = self.seqs.get_mut(&seq) {
                    *s.table.last_mut().unwrap_or(&mut 0) = id;
                }
                copy = Some((last, id));
            }
        }
        let s = self.seqs.get_mut(&seq).expect("known sequence");
        s.tokens.push(token);
        let block = s.table[len / bs];
        if (len + 1).is_multiple_of(bs) {
            self.register_full_block(seq, len / bs);
        }
        Ok(Slot {
            slot: block as usize * bs + len % bs,
            copy,
        })
    }

    /// Starts `child` as a copy of `parent`, sharing all its (unreleased) blocks.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let s = self.seqs[&parent].clone();
        for &id in &s.table[s.released..] {
            self.retain(id);
        }
        self.seqs.insert(child, s);
    }

    /// Ends `seq`, releasing its blocks (full cached ones stay evictable for reuse).
    pub fn finish(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for &id in s.table[s.released..].iter().rev() {
                self.release(id);
            }
        }
    }

    /// Ends `seq`, whose keys and values are written for its first `computed` positions
    /// only (a prompt cancelled half prefilled): its blocks past them leave the prefix
    /// cache before they are released, since their content is not what their keys say.
    pub fn abort(&mut self, seq: SeqId, computed: usize) {
        let Some(s) = self.seqs.get(&seq) else {
            return;
        };
        for &id in &s.table[(computed / self.block_size).max(s.released)..] {
            let block = &mut self.blocks[id as usize];
            // Blocks shared with another sequence were computed by it.
            if block.refs == 1
                && let Some(key) = block.key.take()
            {
                self.cache.remove(&key);
            }
        }
        self.finish(seq);
    }

    /// Releases the blocks of `seq` that hold only positions before `position` (those a
    /// sliding window no longer reads: for a window `W` and `len` positions held, every
    /// later query sees positions from `len + 1 - W` on). Full cached blocks stay
    /// evictable for prefix reuse; returns how many blocks were released.
    pub fn release_before(&mut self, seq: SeqId, position: usize) -> usize {
        let Some(s) = self.seqs.get(&seq) else {
            return 0;
        };
        // Never the block the next position goes into.
        let end = (position / self.block_size).min(s.tokens.len() / self.block_size);
        if end <= s.released {
            return 0;
        }
        let ids = s.table[s.released..end].to_vec();
        for &id in &ids {
            self.release(id);
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.released = end;
        }
        ids.len()
    }

    /// Checks every invariant; returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for (seq, s) in &self.seqs {
            if s.table.len() != s.tokens.len().div_ceil(self.block_size) {
                return Err(format!(
                    "sequence {seq} has {} blocks for {} positions",
                    s.table.len(),
                    s.tokens.len()
                ));
            }
            for &id in &s.table[s.released..] {
                refs[id as usize] += 1;
            }
        }
        let mut state = vec![0u8; self.blocks.len()];
        for &id in &self.free {
            state[id as usize] += 1;
        }
        for &(_, id) in self.evictable.keys() {
            state[id as usize] += 1;
        }
        for (id, b) in self.blocks.iter().enumerate() {
            if b.refs != refs[id] {
                return Err(format!(
                    "block {id} counts {} references but {} tables point at it",
                    b.refs, refs[id]
                ));
            }
            let referenced = u8::from(b.refs > 0);
            if state[id] + referenced != 1 {
                return Err(format!(
                    "block {id} is not exactly one of free, evictable, referenced"
                ));
            }
            if state[id] == 1 && !self.free.contains(&(id as BlockId)) && b.key.is_none() {
                return Err(format!("evictable block {id} is not in the prefix cache"));
            }
        }
        for (&key, &id) in &self.cache {
            if self.blocks[id as usize].key != Some(key) {
                return Err(format!(
                    "prefix cache entry points at block {id} with another key"
                ));
            }
        }
        Ok(())
    }
}
