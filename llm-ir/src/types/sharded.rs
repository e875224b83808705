//! `llm.sharded_tensor`: a global tensor distributed over a device mesh.
//!
//! The semantics follow MLIR's `shard` dialect. A mesh is a list of named axes with sizes
//! (`[tp = 2, dp = 4]` is 8 devices). `split` gives, for every tensor dim, the mesh axes it is
//! split over (major to minor): a dim of size `n` split over axes of sizes `a` and `b` is cut
//! into `a * b` equal shards. Axes not named by any dim replicate the data. `partial` lists
//! axes over which the per-device values are partial results that still need a reduction
//! (`sum`, `max` or `min`) to give the global tensor.

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
    syntax::{self, Dim, PResult},
};

/// The largest mesh accepted (2^20 devices): keeps shard arithmetic far from overflow.
pub const MAX_DEVICES: u64 = 1 << 20;

/// How partial values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Elementwise sum.
    Sum,
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
}

impl Reduction {
    /// The name in the text.
    pub fn name(self) -> &'static str {
        match self {
            Reduction::Sum => "sum",
            Reduction::Max => "max",
            Reduction::Min => "min",
        }
    }

    /// Looks a reduction up by name.
    pub fn from_name(name: &str) -> Option<Reduction> {
        [Reduction::Sum, Reduction::Max, Reduction::Min]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// A tensor sharded over a device mesh:
/// `llm.sharded_tensor <8x64xf32, mesh = [tp = 2], split = [[], [tp]]>`, with an optional
/// trailing `, partial = sum [tp]`.
#[pliron_type(name = "llm.sharded_tensor")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardedTensorType {
    shape: Vec<Dim>,
    dtype: DType,
    mesh: Vec<(String, u64)>,
    split: Vec<Vec<String>>,
    partial: Vec<String>,
    reduction: Reduction,
}

impl ShardedTensorType {
    /// Gets (creating if needed) the uniqued type.
    pub fn get(
        ctx: &Context,
        shape: Vec<Dim>,
        dtype: DType,
        mesh: Vec<(String, u64)>,
        split: Vec<Vec<String>>,
        partial: Vec<String>,
        reduction: Reduction,
    ) -> TypedHandle<Self> {
        Type::instantiate(
            ShardedTensorType {
                shape,
                dtype,
                mesh,
                split,
                partial,
                reduction,
            },
            ctx,
        )
    }

    /// The global shape.
    pub fn shape(&self) -> &[Dim] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The mesh axes and their sizes.
    pub fn mesh(&self) -> &[(String, u64)] {
        &self.mesh
    }

    /// For each dim, the mesh axes it is split over.
    pub fn split(&self) -> &[Vec<String>] {
        &self.split
    }

    /// Mesh axes over which values are partial.
    pub fn partial(&self) -> &[String] {
        &self.partial
    }

    /// How partial values combine.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// The size of mesh axis `name`.
    pub fn axis_size(&self, name: &str) -> Option<u64> {
        self.mesh.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }

    /// Number of devices in the mesh (validated types have at most [`MAX_DEVICES`]).
    pub fn num_devices(&self) -> u64 {
        self.mesh
            .iter()
            .fold(1u64, |acc, (_, s)| acc.saturating_mul(*s))
    }

    /// The shape of the shard each device holds.
    pub fn local_shape(&self) -> Vec<Dim> {
        self.shape
            .iter()
            .zip(&self.split)
            .map(|(d, axes)| {
                let parts = axes
                    .iter()
                    .filter_map(|a| self.axis_size(a))
                    .fold(1u64, u64::saturating_mul);
                d.map(|n| n / parts.max(1))
            })
            .collect()
    }

    /// Same type with other split and partial state.
    pub fn with_distribution(
        &self,
        ctx: &Context,
        split: Vec<Vec<String>>,
        partial: Vec<String>,
    ) -> TypedHandle<Self> {
        Self::get(
            ctx,
            self.shape.clone(),
            self.dtype,
            self.mesh.clone(),
            split,
            partial,
            self.reduction,
        )
    }

    /// Checks the mesh, the split and the partial state against each other and the shape.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.mesh.is_empty() {
            return Err("the mesh needs at least one axis".into());
        }
        if self.num_devices() > MAX_DEVICES {
            return Err(format!("the mesh has more than {MAX_DEVICES} devices"));
        }
        for (i, (name, size)) in self.mesh.iter().enumerate() {
            if *size == 0 {
                return Err(format!("mesh axis `{name}` has size 0"));
            }
            if self.mesh[..i].iter().any(|(n, _)| n == name) {
                return Err(format!("mesh axis `{name}` is declared twice"));
            }
        }
        if self.split.len() != self.shape.len() {
            return Err(format!(
                "split lists {} dims but the tensor has rank {}",
                self.split.len(),
                self.shape.len()
            ));
        }
        let mut used: Vec<&str> = Vec::new();
        for (dim, axes) in self.split.iter().enumerate() {
            let mut parts = 1u64;
            for axis in axes {
                let Some(size) = self.axis_size(axis) else {
                    return Err(format!(
                        "dim {dim} is split over `{axis}`, which is not a mesh axis"
                    ));
                };
                if used.contains(&axis.as_str()) {
                    return Err(format!("mesh axis `{axis}` splits more than one dim"));
                }
                used.push(axis);
                parts *= size;
            }
            if let Some(n) = self.shape[dim]
                && n % parts != 0
            {
                return Err(format!(
                    "dim {dim} of size {n} cannot be split into {parts} equal shards"
                ));
            }
        }
        for (i, axis) in self.partial.iter().enumerate() {
            if self.axis_size(axis).is_none() {
                return Err(format!("partial axis `{axis}` is not a mesh axis"));
            }
            if used.contains(&axis.as_str()) {
                return Err(format!("mesh axis `{axis}` is both split and partial"));
            }
            if self.partial[..i].contains(axis) {
                return Err(format!("partial axis `{axis}` is listed twice"));
            }
        }
        Ok(())
    }

    fn parse_fields(s: &mut StateStream) -> PResult<ShardedTensorType> {
        syntax::expect(s, '<', "to open a sharded tensor type")?;
        syntax::skip_ws(s);
        let loc = s.loc();
        let (shape, dtype) = syntax::shape(s, true)?;
        syntax::expect(s, ',', "after the tensor shape")?;
        syntax::keyword(s, "mesh")?;
        syntax::expect(s, '=', "after `mesh`")?;
        syntax::expect(s, '[', "to open the mesh axes")?;
        let mut mesh = Vec::new();
        loop {
            let (name, _) = syntax::ident(s, "a mesh axis name")?;
            syntax::expect(s, '=', "after a mesh axis name")?;
            mesh.push((name, syntax::size(s, "a mesh axis size")?));
            if syntax::eat(s, ']') {
                break;
            }
            syntax::expect(s, ',', "or `]` in the mesh")?;
        }
        syntax::expect(s, ',', "after the mesh")?;
        syntax::keyword(s, "split")?;
        syntax::expect(s, '=', "after `split`")?;
        syntax::expect(s, '[', "to open the split list")?;
        let mut split = Vec::new();
        if !syntax::eat(s, ']') {
            loop {
                split.push(Self::parse_axis_list(s)?);
                if syntax::eat(s, ']') {
                    break;
                }
                syntax::expect(s, ',', "or `]` in the split list")?;
            }
        }
        let (mut partial, mut reduction) = (Vec::new(), Reduction::Sum);
        if syntax::eat(s, ',') {
            syntax::keyword(s, "partial")?;
            syntax::expect(s, '=', "after `partial`")?;
            let (name, name_loc) = syntax::ident(s, "sum, max or min")?;
            reduction = match Reduction::from_name(&name) {
                Some(r) => r,
                None => {
                    return syntax::error_at(
                        name_loc,
                        format!("expected sum, max or min, found `{name}`"),
                    );
                }
            };
            partial = Self::parse_axis_list(s)?;
            if partial.is_empty() {
                return syntax::error_at(name_loc, "a partial list must name at least one axis");
            }
        }
        syntax::expect(s, '>', "to close a sharded tensor type")?;
        let ty = ShardedTensorType {
            shape,
            dtype: dtype.unwrap_or(DType::F32),
            mesh,
            split,
            partial,
            reduction,
        };
        if let Err(msg) = ty.validate() {
            return syntax::error_at(loc, format!("llm.sharded_tensor: {msg}"));
        }
        Ok(ty)
    }

    fn parse_axis_list(s: &mut StateStream) -> PResult<Vec<String>> {
        syntax::expect(s, '[', "to open a list of mesh axes")?;
        let mut axes = Vec::new();
        if syntax::eat(s, ']') {
            return Ok(axes);
        }
        loop {
            axes.push(syntax::ident(s, "a mesh axis name")?.0);
            if syntax::eat(s, ']') {
                return Ok(axes);
            }
            syntax::expect(s, ',', "or `]` in a list of mesh axes")?;
        }
    }
}

fn axis_list(axes: &[String]) -> String {
    format!("[{}]", axes.join(", "))
}

impl Verify for ShardedTensorType {
    fn verify(&self, _: &Context) -> Result<()> {
        self.validate()
            .map_err(|msg| verify_error_noloc!("llm.sharded_tensor: {msg}"))
    }
}

impl Printable for ShardedTensorType {
    fn fmt(
        &self,
        _: &Context,
        _: &printable::State,
        f: &mut core::fmt::Formatter<'_>,
    ) -> core::fmt::Result {
        let dims = if self.shape.is_empty() {
            self.dtype.to_string()
        } else {
            format!("{}x{}", syntax::print_dims(&self.shape), self.dtype)
        };
        let mesh: Vec<String> = self
            .mesh
            .iter()
            .map(|(n, s)| format!("{n} = {s}"))
            .collect();
        let split: Vec<String> = self.split.iter().map(|a| axis_list(a)).collect();
        write!(
            f,
            "<{dims}, mesh = [{}], split = [{}]",
            mesh.join(", "),
            split.join(", ")
        )?;
        if !self.partial.is_empty() {
            write!(
                f,
                ", partial = {} {}",
                self.reduction.name(),
                axis_list(&self.partial)
            )?;
        }
        write!(f, ">")
    }
}

impl Parsable for ShardedTensorType {
    type Arg = ();
    type Parsed = TypedHandle<Self>;

    fn parse<'a>(s: &mut StateStream<'a>, _: ()) -> ParseResult<'a, Self::Parsed> {
        match Self::parse_fields(s) {
            Ok(ty) => Ok(Type::instantiate(ty, s.state.ctx)).into_parse_result(),
            Err(e) => Err(e),
        }
    }
}
