//! The pass interface, typed pass options, and the registry of every pass.

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
};

/// An error raised by a pass or while building a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassError {
    /// `LINE:COL` of the op at fault, when there is one.
    pub location: Option<(u32, u32)>,
    /// What went wrong.
    pub message: String,
}

impl PassError {
    /// An error with no location.
    pub fn new(message: impl Into<String>) -> PassError {
        PassError {
            location: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for PassError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PassError {}

/// What a pass may be run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A `builtin.module` or any function in it.
    Any,
    /// Only a whole `builtin.module`.
    Module,
}

/// A transformation of the IR under one op (a module or a function).
pub trait Pass {
    /// Runs on the IR nested under `root`; returns whether anything changed.
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError>;
}

/// The kind of value an option takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    /// A non-negative integer.
    Int,
    /// A byte size: an integer with an optional `KiB`, `MiB`, `GiB` (or `K`, `M`, `G`) suffix.
    Bytes,
    /// `auto` or a positive integer.
    AutoOrInt,
    /// `true` or `false`.
    Bool,
}

/// The declaration of one pass option.
#[derive(Debug, Clone, Copy)]
pub struct OptionInfo {
    /// Name, as written in `{name=value}`.
    pub name: &'static str,
    /// Accepted values.
    pub kind: OptionKind,
    /// Default value, in the option syntax.
    pub default: &'static str,
    /// One line of help.
    pub help: &'static str,
}

/// A parsed option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionValue {
    /// An integer or byte size.
    Int(u64),
    /// `auto`.
    Auto,
    /// A boolean.
    Bool(bool),
}

/// Parses `text` as a value of `kind`.
pub fn parse_option(kind: OptionKind, text: &str) -> Result<OptionValue, String> {
    let int = |t: &str| {
        t.parse::<u64>()
            .map_err(|_| format!("`{text}` is not a non-negative integer"))
    };
    match kind {
        OptionKind::Int => int(text).map(OptionValue::Int),
        OptionKind::Bool => match text {
            "true" => Ok(OptionValue::Bool(true)),
            "false" => Ok(OptionValue::Bool(false)),
            _ => Err(format!("`{text}` is not true or false")),
        },
        OptionKind::AutoOrInt => match text {
            "auto" => Ok(OptionValue::Auto),
            _ => match int(text)? {
                0 => Err("expected `auto` or a positive integer, found 0".into()),
                n => Ok(OptionValue::Int(n)),
            },
        },
        OptionKind::Bytes => {
            let split = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let (digits, unit) = text.split_at(split);
            let scale: u64 = match unit {
                "" | "B" => 1,
                "K" | "KiB" => 1 << 10,
                "M" | "MiB" => 1 << 20,
                "G" | "GiB" => 1 << 30,
                _ => {
                    return Err(format!(
                        "`{text}`: unknown size unit `{unit}` (use KiB, MiB or GiB)"
                    ));
                }
            };
            let n = int(digits).map_err(|_| format!("`{text}` is not a byte size"))?;
            n.checked_mul(scale)
                .map(OptionValue::Int)
                .ok_or_else(|| format!("`{text}` is too large"))
        }
    }
}

/// The options of one pass instance, every declared option filled (defaults included).
#[derive(Debug, Clone, Default)]
pub struct PassOptions {
    values: Vec<(&'static str, OptionValue)>,
}

impl PassOptions {
    /// Checks `given` against `declared` and fills in the defaults.
    pub fn resolve(
        pass: &str,
        declared: &[OptionInfo],
        given: &[(String, String)],
    ) -> Result<PassOptions, String> {
        let mut values = Vec::new();
        for (name, _) in given {
            if !declared.iter().any(|o| o.name == name) {
                let known: Vec<&str> = declared.iter().map(|o| o.name).collect();
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                return Err(format!(
                    "pass `{pass}` has no option `{name}` (options: {known})"
                ));
            }
        }
        for info in declared {
            let text = given
                .iter()
                .rev()
                .find(|(n, _)| n == info.name)
                .map_or(info.default, |(_, v)| v.as_str());
            let value = parse_option(info.kind, text)
                .map_err(|e| format!("option `{}` of pass `{pass}`: {e}", info.name))?;
            values.push((info.name, value));
        }
        Ok(PassOptions { values })
    }

    fn get(&self, name: &str) -> OptionValue {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(OptionValue::Auto, |(_, v)| *v)
    }

    /// An integer or byte-size option.
    pub fn int(&self, name: &str) -> u64 {
        match self.get(name) {
            OptionValue::Int(n) => n,
            _ => 0,
        }
    }

    /// An `auto`-or-integer option (`None` for `auto`).
    pub fn auto_or_int(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            OptionValue::Int(n) => Some(n),
            _ => None,
        }
    }

    /// A boolean option.
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), OptionValue::Bool(true))
    }
}

/// A registered pass: its command-line name, summary, options and constructor.
#[derive(Clone, Copy)]
pub struct PassInfo {
    /// Kebab-case name (`plan-kv-memory`).
    pub name: &'static str,
    /// One-line summary.
    pub summary: &'static str,
    /// Declared options.
    pub options: &'static [OptionInfo],
    /// Where the pass may run.
    pub scope: Scope,
    /// Builds an instance from its options.
    pub create: fn(&PassOptions) -> Box<dyn Pass>,
}

/// Every pass, in the order `--list-passes` prints them.
pub static PASSES: &[PassInfo] = &[
    crate::canonicalize::INFO,
    crate::cse::INFO,
    crate::dce::INFO,
    crate::fuse::INFO,
    crate::quantize_activations::INFO,
    crate::widen_floats::INFO,
    crate::plan_kv_memory::INFO,
    crate::plan_buffers::INFO,
];

/// Named pipelines, usable as a pass name in a pipeline.
pub static PIPELINES: &[(&str, &str, &str)] = &[(
    "default",
    "widen-floats,canonicalize,cse,fuse,canonicalize,dce",
    "the pipeline llm-run builds on (every bit kept): f16/bf16 norms and matmuls in f32, simplify, share, fuse, simplify again, drop dead ops",
)];

/// Looks a pass up by name.
pub fn lookup(name: &str) -> Option<&'static PassInfo> {
    PASSES.iter().find(|p| p.name == name)
}

/// The registry as text, for `llm-opt --list-passes`.
pub fn describe_passes() -> String {
    let mut out = String::new();
    for p in PASSES {
        out.push_str(&format!("{:<16} {}\n", p.name, p.summary));
        for o in p.options {
            let kind = match o.kind {
                OptionKind::Int => "int",
                OptionKind::Bytes => "bytes",
                OptionKind::AutoOrInt => "auto|int",
                OptionKind::Bool => "bool",
            };
            let name = format!("{}=<{kind}>", o.name);
            out.push_str(&format!(
                "    {name:<28} {} (default {})\n",
                o.help, o.default
            ));
        }
    }
    out.push_str("\npipelines:\n");
    for (name, text, summary) in PIPELINES {
        out.push_str(&format!("{name:<16} {summary}\n    = {text}\n"));
    }
    out
}
