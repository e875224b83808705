//! `llm.paged_kv_cache`: the paged key/value block pool of a whole model.
//!
//! The pool holds `blocks` blocks; each block stores `block_size` consecutive token positions
//! of one sequence, for every layer, both K and V. Logically the pool is the array
//! `[layers][2][blocks][block_size][kv_heads][head_dim]` (index 0 of the second dim is K,
//! 1 is V). A sequence owns a list of blocks (its block table); token position `p` of the
//! sequence lives in block `table[p / block_size]` at offset `p % block_size`. Quantized
//! storage formats group values along `head_dim`.

use pliron::{
    common_traits::Verify,
    context::Context,
    derive::pliron_type,
    parsable::{IntoParseResult, Parsable, ParseResult, StateStream, StreamLocation},
    printable::{self, Printable},
    result::Result,
    r#type::{Type, TypedHandle},
    verify_error_noloc,
};

use crate::{
    dtype::DType,
    syntax::{self, PResult},
    types::QuantFormat,
};

/// How KV values are stored: a float element type or a quantization format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvStorage {
    /// Plain floats (`f32`, `f16`, `bf16`).
    Float(DType),
    /// Quantized along `head_dim` (`q8_0`, `int8 {...}`, ...).
    Quantized(QuantFormat),
}

impl std::fmt::Display for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStorage::Float(d) => write!(f, "{d}"),
            KvStorage::Quantized(q) => write!(f, "{q}"),
        }
    }
}

/// The paged KV cache of a model:
/// `llm.paged_kv_cache <layers = 2, kv_heads = 4, head_dim = 64, block_size = 16, blocks = 128, dtype = f16>`,
/// optionally followed by `, window = N` for a sliding-window model. `blocks = ?` leaves the
/// block count to the memory planner.
#[pliron_type(name = "llm.paged_kv_cache")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PagedKvCacheType {
    layers: u64,
    kv_heads: u64,
    head_dim: u64,
    block_size: u64,
    blocks: Option<u64>,
    storage: KvStorage,
    window: Option<u64>,
}

/// The parameters of a [`PagedKvCacheType`], for construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvCacheParams {
    /// Number of layers.
    pub layers: u64,
    /// Number of key/value heads.
    pub kv_heads: u64,
    /// Elements per head.
    pub head_dim: u64,
    /// Token positions per block.
    pub block_size: u64,
    /// Blocks in the pool, or `None` to leave it to the memory planner.
    pub blocks: Option<u64>,
    /// Storage of K and V values.
    pub storage: KvStorage,
    /// Sliding-window length, if the model attends only to the last `window` positions.
    pub window: Option<u64>,
}

impl PagedKvCacheType {
    /// Gets (creating if needed) the uniqued cache type.
    pub fn get(ctx: &Context, p: KvCacheParams) -> TypedHandle<Self> {
        let KvCacheParams {
            layers,
            kv_heads,
            head_dim,
            block_size,
            blocks,
            storage,
            window,
        } = p;
        Type::instantiate(
            PagedKvCacheType {
                layers,
                kv_heads,
                head_dim,
                block_size,
                blocks,
                storage,
                window,
            },
            ctx,
        )
    }

    /// The parameters of this type.
    pub fn params(&self) -> KvCacheParams {
        KvCacheParams {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            blocks: self.blocks,
            storage: self.storage.clone(),
            window: self.window,
        }
    }

    /// Number of layers.
    pub fn layers(&self) -> u64 {
        self.layers
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> u64 {
        self.kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> u64 {
        self.head_dim
    }

    /// Token positions per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks in the pool (`None` until planned).
    pub fn blocks(&self) -> Option<u64> {
        self.blocks
    }

    /// Storage of values.
    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }

    /// Sliding window, if any.
    pub fn window(&self) -> Option<u64> {
        self.window
    }

    /// Checks every parameter.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive, found 0"));
            }
        }
        if self.blocks == Some(0) {
            return Err("blocks must be positive or `?`, found 0".into());
        }
        if self.window == Some(0) {
            return Err("window must be positive, found 0".into());
        }
        match &self.storage {
            KvStorage::Float(d) if !d.is_float() => Err(format!(
                "dtype must be f32, f16, bf16 or a quantization format, found {d}"
            )),
            KvStorage::Float(_) => Ok(()),
            KvStorage::Quantized(QuantFormat::F16 | QuantFormat::BF16) => Err(
                "a cache of 16-bit floats has the float dtype (`dtype = f16` or `bf16`), not the storage format".into(),
            ),
            KvStorage::Quantized(q) => {
                q.validate()?;
                if let QuantFormat::Affine { axis, .. } = q
                    && *axis != 3
                {
                    return Err(format!(
                        "quantized KV groups run along head_dim, so the affine axis must be 3 (pool layout [blocks, block_size, kv_heads, head_dim]), found {axis}"
                    ));
                }
                let block = q.block_elems();
                if !self.head_dim.is_multiple_of(block) {
                    return Err(format!(
                        "{} groups {block} values along head_dim, but head_dim is {}",
                        q.name(),
                        self.head_dim
                    ));
                }
                Ok(())
            }
        }
    }

    fn parse_fields(s: &mut StateStream) -> PResult<PagedKvCacheType> {
        syntax::expect(s, '<', "to open a KV cache type")?;
        syntax::skip_ws(s);
        let loc = s.loc();
        let field = |s: &mut StateStream, name: &str, first: bool| -> PResult<()> {
            if !first {
                syntax::expect(s, ',', &format!("before `{name}`"))?;
            }
            syntax::keyword(s, name)?;
            syntax::expect(s, '=', &format!("after `{name}`"))
        };
        field(s, "layers", true)?;
        let layers = syntax::size(s, "layers")?;
        field(s, "kv_heads", false)?;
        let kv_heads = syntax::size(s, "kv_heads")?;
        field(s, "head_dim", false)?;
        let head_dim = syntax::size(s, "head_dim")?;
        field(s, "block_size", false)?;
        let block_size = syntax::size(s, "block_size")?;
        field(s, "blocks", false)?;
        let blocks = if syntax::eat(s, '?') {
            None
        } else {
            Some(syntax::size(s, "blocks")?)
        };
        field(s, "dtype", false)?;
        let (name, name_loc) = syntax::ident(s, "a storage type")?;
        let storage = match DType::from_name(&name) {
            Some(d) => KvStorage::Float(d),
            None => KvStorage::Quantized(QuantFormat::parse_after_name(s, name, name_loc)?),
        };
        let window = if syntax::eat(s, ',') {
            syntax::keyword(s, "window")?;
            syntax::expect(s, '=', "after `window`")?;
            Some(syntax::size(s, "window")?)
        } else {
            None
        };
        syntax::expect(s, '>', "to close a KV cache type")?;
        let ty = PagedKvCacheType {
            layers,
            kv_heads,
            head_dim,
            block_size,
            blocks,
            storage,
            window,
        };
        if let Err(msg) = ty.validate() {
            return syntax::error_at(loc, format!("llm.paged_kv_cache: {msg}"));
        }
        Ok(ty)
    }
}

impl Verify for PagedKvCacheType {
    fn verify(&self, _: &Context) -> Result<()> {
        self.validate()
            .map_err(|msg| verify_error_noloc!("llm.paged_kv_cache: {msg}"))
    }
}

impl Printable for PagedKvCacheType {
    fn fmt(
        &self,
        _: &Context,
        _: &printable::State,
        f: &mut core::fmt::Formatter<'_>,
    ) -> core::fmt::Result {
        let blocks = self.blocks.map_or("?".to_string(), |b| b.to_string());
        write!(
            f,
            "<layers = {}, kv_heads = {}, head_dim = {}, block_size = {}, blocks = {blocks}, dtype = {}",
            self.layers, self.kv_heads, self.head_dim, self.block_size, self.storage
        )?;
        if let Some(w) = self.window {
            write!(f, ", window = {w}")?;
        }
        write!(f, ">")
    }
}

impl Parsable for PagedKvCacheType {
    type Arg = ();
    type Parsed = TypedHandle<Self>;

    fn parse<'a>(s: &mut StateStream<'a>, _: ()) -> ParseResult<'a, Self::Parsed> {
        match Self::parse_fields(s) {
            Ok(ty) => Ok(Type::instantiate(ty, s.state.ctx)).into_parse_result(),
            Err(e) => Err(e),
        }
    }
}
