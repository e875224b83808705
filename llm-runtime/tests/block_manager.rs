//! Property tests of the KV block manager: 100,000 random admit / append / fork / finish /
//! preempt / window-release operations, with every invariant checked after each one, and
//! the memory targets.

use llm_runtime::{
    block_manager::{BlockManager, OutOfBlocks, SeqId},
    sampler::XorShift,
};

#[test]
fn invariants_hold_over_100000_random_operations() {
    let mut rng = XorShift::new(0xB10C);
    let mut m = BlockManager::new(64, 4);
    let mut live: Vec<SeqId> = Vec::new();
    let mut next: SeqId = 0;
    // A few shared prefixes make prefix-cache hits and evictions common.
    let prefixes: Vec<Vec<u32>> = (0..4)
        .map(|p| (0..12).map(|i| p * 100 + i).collect())
        .collect();
    let (mut hits, mut copies, mut evictions_needed, mut released) = (0, 0, 0, 0);
    for step in 0..100_000 {
        let r = rng.next_u64();
        match r % 11 {
            0..=2 => {
                let prefix = &prefixes[(r >> 8) as usize % prefixes.len()];
                let keep = (r >> 16) as usize % (prefix.len() + 1);
                let extra = (r >> 24) as usize % 6;
                let prompt: Vec<u32> = prefix[..keep]
                    .iter()
                    .copied()
                    .chain((0..extra as u32).map(|i| 1000 + i))
                    .collect();
                if prompt.is_empty() {
                    continue;
                }
                match m.admit(next, &prompt) {
                    Ok(cached) => {
                        hits += usize::from(cached > 0);
                        live.push(next);
                    }
                    Err(OutOfBlocks) => evictions_needed += 1,
                }
                next += 1;
            }
            3..=6 if !live.is_empty() => {
                let seq = live[(r >> 8) as usize % live.len()];
                match m.append(seq, (r >> 20) as u32 % 50) {
                    Ok(slot) => copies += usize::from(slot.copy.is_some()),
                    Err(OutOfBlocks) => {
                        // Preempt: release the sequence; it would be recomputed later.
                        m.finish(seq);
                        live.retain(|&s| s != seq);
                    }
                }
            }
            7 if !live.is_empty() => {
                let parent = live[(r >> 8) as usize % live.len()];
                m.fork(parent, next);
                live.push(next);
                next += 1;
            }
            8 | 9 if !live.is_empty() => {
                let seq = live.swap_remove((r >> 8) as usize % live.len());
                m.finish(seq);
            }
            10 if !live.is_empty() => {
                // A sliding window moves past some of the sequence's positions.
                let seq = live[(r >> 8) as usize % live.len()];
                let len = m.len(seq).expect("live");
                released += m.release_before(seq, (r >> 20) as usize % (len + 1));
            }
            _ => {}
        }
        if let Err(e) = m.check() {
            panic!("step {step}: {e}");
        }
    }
    assert!(
        hits > 100 && copies > 100 && evictions_needed > 0 && released > 100,
        "hits {hits}, copies {copies}, full {evictions_needed}, released {released}"
    );
    for seq in live {
        m.finish(seq);
    }
    m.check().expect("invariants after draining");
    assert_eq!(m.used(), 0);
    assert_eq!(m.available(), 64);
}

#[test]
fn copy_on_write_and_prefix_reuse() {
    let mut m = BlockManager::new(8, 4);
    assert_eq!(m.admit(1, &[1, 2, 3, 4, 5, 6]).expect("fits"), 0);
    m.fork(1, 2);
    // The shared, partly filled last block is copied before sequence 2 writes to it.
    let slot = m.append(2, 7).expect("fits");
    let (from, to) = slot.copy.expect("copy on write");
    assert_eq!(m.table(1).expect("seq 1")[1], from);
    assert_eq!(m.table(2).expect("seq 2")[1], to);
    assert_eq!(slot.slot, to as usize * 4 + 2);
    // A later prompt with the same first block reuses it.
    m.finish(1);
    m.finish(2);
    assert_eq!(m.admit(3, &[1, 2, 3, 4, 9, 9]).expect("fits"), 4);
    m.check().expect("invariants");
}

#[test]
fn paged_memory_targets() {
    // Mixed lengths uniform in 16..512 under a fixed budget of 4096 positions.
    let block = 16;
    let budget_positions = 4096;
    let mut rng = XorShift::new(7);
    let lengths: Vec<usize> = (0..1000)
        .map(|_| 16 + (rng.next_u64() % 496) as usize)
        .collect();
    let mut m = BlockManager::new(budget_positions / block, block);
    let mut admitted = 0;
    for (i, &len) in lengths.iter().enumerate() {
        let prompt: Vec<u32> = (0..len as u32).map(|t| t + 10_000 * i as u32).collect();
        if m.admit(i as SeqId, &prompt).is_err() {
            break;
        }
        admitted += 1;
    }
    let allocated = m.used() * block;
    let waste = 1.0 - m.tokens_held() as f64 / allocated as f64;
    let contiguous = budget_positions / 512;
    println!(
        "paged: {admitted} sequences, {:.2}% of allocated KV slots empty; contiguous max-length: {contiguous}",
        waste * 100.0
    );
    assert!(waste < 0.04, "waste {waste}");
    // A contiguous cache reserves 512 positions per sequence, the paged one about the mean
    // length (264) rounded up to blocks, so the ratio is bounded by 512 / 264 = 1.94 here;
    // the 4x target cannot be met by full-length sequences of this workload.
    assert!(
        admitted * 10 >= contiguous * 18,
        "{admitted} vs {contiguous}"
    );
}

/// What [`serve_mixed_lengths`] measured.
struct Served {
    /// Running sequences per decode step, on average.
    mean_running: f64,
    /// Decode steps.
    steps: usize,
    /// Tokens generated.
    generated: usize,
    /// Sequences preempted.
    preemptions: usize,
    /// Positions prefilled again after preemptions.
    recomputed: usize,
}

/// The same workload served: requests of a 16-token prompt whose sequences end at lengths
/// uniform in 16..512, under the same budget of 4096 positions, scheduled as the engine
/// schedules them (admit while the pool has the prompt's blocks; when a decode step runs
/// out, preempt the most recently admitted sequence and recompute it later). Sequences
/// hold only the positions they have reached, so the pool keeps more of them running than
/// the static count above, and the contiguous cache still 8.
fn serve_mixed_lengths(requests: usize, budget_positions: usize) -> Served {
    let block = 16;
    let mut rng = XorShift::new(11);
    let mut m = BlockManager::new(budget_positions / block, block);
    // (id, tokens so far, final length, admission order); the waiting queue holds the same.
    type Seq = (SeqId, Vec<u32>, usize, usize);
    let mut waiting: std::collections::VecDeque<Seq> = (0..requests)
        .map(|i| {
            let prompt = (0..16).map(|t| t + 10_000 * i as u32).collect();
            (i as SeqId, prompt, 16 + (rng.next_u64() % 497) as usize, 0)
        })
        .collect();
    let mut running: Vec<Seq> = Vec::new();
    let (mut steps, mut running_sum, mut generated, mut preemptions, mut admissions) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut recomputed = 0usize;
    while !waiting.is_empty() || !running.is_empty() {
        while let Some(mut seq) = waiting.pop_front() {
            if m.admit(seq.0, &seq.1).is_err() {
                waiting.push_front(seq);
                break;
            }
            admissions += 1;
            seq.3 = admissions;
            running.push(seq);
        }
        steps += 1;
        running_sum += running.len();
        let mut i = 0;
        while i < running.len() {
            let token = running[i].1.len() as u32;
            match m.append(running[i].0, token) {
                Ok(_) => {
                    running[i].1.push(token);
                    generated += 1;
                    i += 1;
                }
                Err(OutOfBlocks) => {
                    let victim = (0..running.len())
                        .max_by_key(|&j| running[j].3)
                        .expect("a running sequence");
                    let seq = running.remove(victim);
                    m.finish(seq.0);
                    preemptions += 1;
                    recomputed += seq.1.len();
                    waiting.push_front(seq);
                    if victim < i {
                        i -= 1;
                    }
                }
            }
        }
        running.retain(|seq| {
            let done = seq.1.len() >= seq.2;
            if done {
                m.finish(seq.0);
            }
            !done
        });
    }
    m.check().expect("invariants");
    Served {
        mean_running: running_sum as f64 / steps as f64,
        steps,
        generated,
        preemptions,
        recomputed,
    }
}

#[test]
fn mixed_lengths_served_keep_more_sequences_running() {
    let served = serve_mixed_lengths(1000, 4096);
    let mean_running = served.mean_running;
    let contiguous = 4096 / 512;
    println!(
        "served: {mean_running:.1} sequences running on average against {contiguous} for a contiguous max-length cache ({:.2}x); {} tokens generated in {} decode steps (the contiguous cache needs at least {}), {} preemptions, {} positions prefilled again",
        mean_running / contiguous as f64,
        served.generated,
        served.steps,
        served.generated.div_ceil(contiguous),
        served.preemptions,
        served.recomputed
    );
    // A sequence holds about half its final length on average over its life, so the
    // pool runs about 512 / (E[L^2] / 2E[L]) = 3.0x the contiguous cache's sequences here
    // (2.7x measured: blocks are rounded up, and preempted sequences wait), not 4x.
    assert!(mean_running >= 2.5 * contiguous as f64, "{mean_running}");
}

#[test]
fn shared_prefixes_use_a_third_of_the_blocks() {
    let block = 16;
    let prefix: Vec<u32> = (0..256).collect();
    let requests: Vec<Vec<u32>> = (0..16u32)
        .map(|i| prefix.iter().copied().chain([1000 + i, 2000 + i]).collect())
        .collect();
    let blocks_for = |share: bool| {
        let mut m = BlockManager::new(1024, block);
        for (i, prompt) in requests.iter().enumerate() {
            if !share {
                // A distinct first token defeats sharing.
                let mut p = prompt.clone();
                p[0] = 50_000 + i as u32;
                m.admit(i as SeqId, &p).expect("fits");
            } else {
                m.admit(i as SeqId, prompt).expect("fits");
            }
        }
        m.used()
    };
    let (shared, unshared) = (blocks_for(true), blocks_for(false));
    println!("16 requests with a 256-token prefix: {shared} blocks shared vs {unshared} unshared");
    assert!(shared * 3 <= unshared, "{shared} vs {unshared}");
}

#[test]
fn a_block_is_never_reused_at_another_position() {
    // Two identical sequences: the second's first block is a duplicate (not registered), so
    // its second block's key must still chain from the first block's content.
    let mut m = BlockManager::new(16, 4);
    for seq in [1, 2] {
        m.admit(seq, &[1, 2, 3, 4]).expect("fits");
        for t in [5, 6, 7, 8] {
            m.append(seq, t).expect("fits");
        }
    }
    // A prompt that starts with the second block's tokens shares no prefix with them.
    assert_eq!(m.admit(3, &[5, 6, 7, 8, 9]).expect("fits"), 0);
    // A prompt with the whole prefix reuses both blocks.
    assert_eq!(m.admit(4, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).expect("fits"), 8);
    m.check().expect("invariants");
}

/// `release_before` releases exactly the blocks whose positions all come before the
/// position, never the block the next position goes into, and each block once.
#[test]
fn window_releases_stop_at_the_block_of_the_position() {
    let mut m = BlockManager::new(8, 4);
    let tokens: Vec<u32> = (0..10).collect();
    m.admit(1, &tokens).expect("room");
    // Blocks hold positions 0..4, 4..8 and 8..10.
    assert_eq!(m.release_before(1, 3), 0, "position 3 is in block 0");
    assert_eq!(m.release_before(1, 7), 1, "block 0 only");
    assert_eq!(m.release_before(1, 7), 0, "released once");
    assert_eq!(m.release_before(1, 8), 1, "block 1 ends at position 8");
    assert_eq!(
        m.release_before(1, 100),
        0,
        "block 2 holds the next position"
    );
    assert_eq!(m.tokens_held(), 2);
    m.check().expect("invariants");
    // With full blocks, every block goes: the next position opens a new one.
    m.admit(2, &(0..8).collect::<Vec<u32>>()).expect("room");
    assert_eq!(m.release_before(2, 100), 2);
    let slot = m.append(2, 9).expect("a block");
    assert_eq!(m.table(2).map(<[u32]>::len), Some(3));
    assert_eq!(slot.copy, None);
    m.check().expect("invariants");
    m.finish(1);
    m.finish(2);
    m.check().expect("invariants");
    assert_eq!(m.used(), 0);
}

/// A sequence aborted after writing only part of its prompt leaves only the blocks it
/// wrote in the prefix cache: a later sequence with the same prompt reuses those alone.
#[test]
fn aborted_prompts_cache_only_their_written_blocks() {
    let mut m = BlockManager::new(8, 4);
    let prompt: Vec<u32> = (0..13).collect();
    m.admit(1, &prompt).expect("room");
    m.abort(1, 6);
    m.check().expect("invariants");
    assert_eq!(m.admit(2, &prompt), Ok(4), "block 0 alone was written");
    m.finish(2);
    // Finished normally, every full block it wrote is reused.
    assert_eq!(m.admit(3, &prompt), Ok(12));
    m.check().expect("invariants");
}
