//! `llm.tensor`: a ranked tensor with static or dynamic dims.

use pliron::{
    context::Context,
    derive::pliron_type,
    parsable::{IntoParseResult, Parsable, ParseResult, StateStream},
    printable::{self, Printable},
    r#type::{Type, TypedHandle},
};

use crate::{
    dtype::DType,
    syntax::{self, Dim},
};

/// A ranked tensor: `llm.tensor <4x?x8xf32>`; a rank-0 tensor is `llm.tensor <f32>`.
///
/// Dims are `Some(size)` or `None` (dynamic, written `?`), resolved at run time.
#[pliron_type(name = "llm.tensor", verifier = "succ")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    shape: Vec<Dim>,
    dtype: DType,
}

impl TensorType {
    /// Gets (creating if needed) the uniqued tensor type.
    pub fn get(ctx: &Context, shape: Vec<Dim>, dtype: DType) -> TypedHandle<Self> {
        Type::instantiate(TensorType { shape, dtype }, ctx)
    }

    /// Gets a tensor type with only static dims.
    pub fn get_static(ctx: &Context, shape: &[u64], dtype: DType) -> TypedHandle<Self> {
        Self::get(ctx, shape.iter().map(|&d| Some(d)).collect(), dtype)
    }

    /// The dims.
    pub fn shape(&self) -> &[Dim] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl Printable for TensorType {
    fn fmt(
        &self,
        _: &Context,
        _: &printable::State,
        f: &mut core::fmt::Formatter<'_>,
    ) -> core::fmt::Result {
        if self.shape.is_empty() {
            write!(f, "<{}>", self.dtype)
        } else {
            write!(f, "<{}x{}>", syntax::print_dims(&self.shape), self.dtype)
        }
    }
}

impl Parsable for TensorType {
    type Arg = ();
    type Parsed = TypedHandle<Self>;

    fn parse<'a>(s: &mut StateStream<'a>, _: ()) -> ParseResult<'a, Self::Parsed> {
        let parsed = (|| {
            syntax::expect(s, '<', "to open a tensor type")?;
            let (shape, dtype) = syntax::shape(s, true)?;
            syntax::expect(s, '>', "to close a tensor type")?;
            Ok((shape, dtype.unwrap_or(DType::F32)))
        })();
        match parsed {
            Ok((shape, dtype)) => {
                Ok(TensorType::get(s.state.ctx, shape, dtype)).into_parse_result()
            }
            Err(e) => Err(e),
        }
    }
}
