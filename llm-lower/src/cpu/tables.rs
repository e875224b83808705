//! Tables that the kernels of every layer of one program call share, computed by the
//! first kernel that needs them in a call and reused by the others: rope's sines and
//! cosines ([`RopeTables`]) and the key/value row offsets of paged attention
//! ([`PagedRows`]). `clear` starts a call.

use std::cell::RefCell;

use llm_ir::interp::{
    KvCache, Tensor,
    eval::attention::{RopeAngles, for_each_paged_row},
};

/// The sine and cosine tables of one rope configuration at some positions.
struct RopeTable {
    angles: RopeAngles,
    positions: Vec<i64>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The rope tables of one program run: the q and k of every layer rotate by the same
/// positions, so each table is computed once per run (`clear` starts a run).
#[derive(Default)]
pub struct RopeTables(RefCell<Vec<RopeTable>>);

impl RopeTables {
    /// Forgets the tables of the previous run.
    pub fn clear(&self) {
        self.0.borrow_mut().clear();
    }

    /// Calls `f` with the cosines and sines (token-major, `rotary / 2` per token) of
    /// `angles` at `positions`, computed here (Cranelift has no trigonometric
    /// instructions) exactly as the reference does, once per run.
    pub fn with(&self, angles: &RopeAngles, positions: &[i64], f: impl FnOnce(&[f32], &[f32])) {
        let mut tables = self.0.borrow_mut();
        let found = tables
            .iter()
            .position(|t| t.angles == *angles && t.positions == positions);
        let i = found.unwrap_or_else(|| {
            let (cos, sin) = angles.tables(positions);
            tables.push(RopeTable {
                angles: angles.clone(),
                positions: positions.to_vec(),
                cos,
                sin,
            });
            tables.len() - 1
        });
        f(&tables[i].cos, &tables[i].sin);
    }
}

/// What the offsets of one call's paged attentions depend on: the block tables and
/// context lengths (their values), the window, the `[sequences, tokens]` of the queries,
/// and the pool's geometry.
#[derive(PartialEq)]
struct RowsKey {
    tables: Vec<i64>,
    lens: Vec<i64>,
    window: Option<usize>,
    rows: [usize; 2],
    geometry: [usize; 2],
}

/// The byte offsets of the key/value rows each query row of the paged attentions of one
/// call sees, from the start of a layer's rows: the same for every layer (the block tables
/// do not change between layers), so the block tables are read once per call, not once per
/// layer.
#[derive(Default)]
pub struct PagedRows(RefCell<Option<(RowsKey, Vec<Vec<i64>>)>>);

impl PagedRows {
    /// Forgets the offsets of the previous call.
    pub fn clear(&self) {
        self.0.borrow_mut().take();
    }

    /// Calls `f` with the offsets of each query row (row `s * t + i` for query `i` of
    /// sequence `s`), checked against `cache` by [`for_each_paged_row`] when first made.
    pub fn with<T>(
        &self,
        cache: &KvCache,
        (rows, tables, lens, window): ([usize; 2], &Tensor, &Tensor, Option<usize>),
        f: impl FnOnce(&[Vec<i64>]) -> T,
    ) -> Result<T, String> {
        let (table_ids, len_values) = (tables.ints()?, lens.ints()?);
        let geometry = [cache.blocks, cache.slot_len()];
        let mut cached = self.0.borrow_mut();
        let same = |k: &RowsKey| {
            k.tables == table_ids
                && k.lens == len_values
                && k.window == window
                && k.rows == rows
                && k.geometry == geometry
        };
        if cached.as_ref().is_none_or(|(k, _)| !same(k)) {
            let key = RowsKey {
                tables: table_ids.to_vec(),
                lens: len_values.to_vec(),
                window,
                rows,
                geometry,
            };
            let mut all = Vec::with_capacity(rows[0] * rows[1]);
            for_each_paged_row(cache, rows, tables, lens, window, |_, slots| {
                all.push(
                    slots
                        .iter()
                        .map(|&slot| (4 * slot * cache.slot_len()) as i64)
                        .collect(),
                );
                Ok(())
            })?;
            *cached = Some((key, all));
        }
        Ok(f(cached.as_ref().map_or(&[], |(_, all)| all)))
    }
}

#[cfg(test)]
mod tests {
    use llm_ir::{
        dtype::DType,
        types::{KvCacheParams, KvStorage},
    };

    use super::*;

    fn ints(shape: Vec<usize>, values: Vec<i64>) -> Tensor {
        Tensor::from_i64(shape, DType::I32, values)
    }

    /// The offsets are made once per call for the same tables, again for other tables,
    /// and the rows are those of the block tables, from a layer's start.
    #[test]
    fn paged_rows_are_made_once_per_tables() {
        let params = KvCacheParams {
            layers: 2,
            kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            blocks: None,
            storage: KvStorage::Float(DType::F32),
            window: None,
        };
        let cache = KvCache::new(params, 4);
        let rows = PagedRows::default();
        let (tables, lens) = (ints(vec![1, 2], vec![3, 1]), ints(vec![1], vec![3]));
        let slot = |s: i64| 4 * s * 2;
        let first = rows
            .with(&cache, ([1, 1], &tables, &lens, None), |all| {
                assert_eq!(all, [vec![slot(6), slot(7), slot(2)]]);
                all.as_ptr()
            })
            .unwrap();
        let again = rows
            .with(&cache, ([1, 1], &tables, &lens, None), |all| all.as_ptr())
            .unwrap();
        assert_eq!(first, again, "made once");
        let other = ints(vec![1, 2], vec![0, 1]);
        rows.with(&cache, ([1, 1], &other, &lens, None), |all| {
            assert_eq!(all, [vec![slot(0), slot(1), slot(2)]]);
        })
        .unwrap();
        let bad = ints(vec![1, 2], vec![9, 1]);
        assert!(
            rows.with(&cache, ([1, 1], &bad, &lens, None), |_| ())
                .is_err()
        );
    }
}
