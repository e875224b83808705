//! Op parameters: the values written between braces after an op's operands.
//!
//! `v3 = llm.attention v0, v1, v2 {kv_heads = 2, scale = 0.125, causal = true} : ...`
//!
//! Each parameter is stored in the op's attribute dictionary as a [`ParamAttr`] under the key
//! `llm_<name>`. Each op declares a schema ([`ParamSpec`]s) that the parser and the verifier
//! both check, so IR built from Rust and IR parsed from text obey the same rules.

use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};

use pliron::{
    context::Context,
    derive::pliron_attr,
    identifier::Identifier,
    location::Location,
    parsable::{IntoParseResult, Parsable, ParseResult, StateStream},
    printable::{self, Printable},
};

use crate::syntax::{self, Number, PResult};

/// The value of one op parameter.
#[derive(Debug, Clone)]
pub enum ParamValue {
    /// An integer (`4`, `-1`).
    Int(i64),
    /// A finite float (`0.125`, `1e-5`).
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A quoted string (`"layers.0.wq"`).
    Str(String),
    /// A bare word (`interleaved`, `tp`).
    Word(String),
    /// A bracketed list (`[1, 0, 2]`, `[tp, dp]`).
    List(Vec<ParamValue>),
}

impl PartialEq for ParamValue {
    fn eq(&self, other: &Self) -> bool {
        use ParamValue::*;
        match (self, other) {
            (Int(a), Int(b)) => a == b,
            (Float(a), Float(b)) => a.to_bits() == b.to_bits(),
            (Bool(a), Bool(b)) => a == b,
            (Str(a), Str(b)) | (Word(a), Word(b)) => a == b,
            (List(a), List(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for ParamValue {}

impl Hash for ParamValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        core::mem::discriminant(self).hash(state);
        match self {
            ParamValue::Int(v) => v.hash(state),
            ParamValue::Float(v) => v.to_bits().hash(state),
            ParamValue::Bool(v) => v.hash(state),
            ParamValue::Str(v) | ParamValue::Word(v) => v.hash(state),
            ParamValue::List(v) => v.hash(state),
        }
    }
}

impl ParamValue {
    /// A short name of the value's kind, for diagnostics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ParamValue::Int(_) => "integer",
            ParamValue::Float(_) => "float",
            ParamValue::Bool(_) => "boolean",
            ParamValue::Str(_) => "string",
            ParamValue::Word(_) => "word",
            ParamValue::List(_) => "list",
        }
    }

    /// The value as a list of integers, if it is one.
    pub fn as_int_list(&self) -> Option<Vec<i64>> {
        match self {
            ParamValue::List(items) => items
                .iter()
                .map(|v| match v {
                    ParamValue::Int(i) => Some(*i),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// The value as a list of words, if it is one.
    pub fn as_word_list(&self) -> Option<Vec<String>> {
        match self {
            ParamValue::List(items) => items
                .iter()
                .map(|v| match v {
                    ParamValue::Word(w) => Some(w.clone()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// The value as a number (an integer widened to `f64`), if it is one.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            ParamValue::Int(v) => Some(*v as f64),
            ParamValue::Float(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => f.write_str(&syntax::print_float(*v)),
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Str(v) => f.write_str(&syntax::quote(v)),
            ParamValue::Word(v) => f.write_str(v),
            ParamValue::List(items) => {
                f.write_char('[')?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_char(']')
            }
        }
    }
}

/// Maximum nesting depth of lists; deeper input is rejected instead of overflowing the stack.
const MAX_LIST_DEPTH: usize = 16;

/// Parses one parameter value.
pub fn parse_value(s: &mut StateStream) -> PResult<ParamValue> {
    parse_value_at_depth(s, 0)
}

fn parse_value_at_depth(s: &mut StateStream, depth: usize) -> PResult<ParamValue> {
    syntax::skip_ws(s);
    match syntax::peek(s) {
        Some('"') => Ok(ParamValue::Str(syntax::string(s)?)),
        Some('[') => {
            if depth >= MAX_LIST_DEPTH {
                return syntax::error_here(s, "lists are nested too deeply");
            }
            syntax::bump(s);
            let mut items = Vec::new();
            if !syntax::eat(s, ']') {
                loop {
                    items.push(parse_value_at_depth(s, depth + 1)?);
                    if syntax::eat(s, ']') {
                        break;
                    }
                    syntax::expect(s, ',', "or `]` in a list")?;
                }
            }
            Ok(ParamValue::List(items))
        }
        Some(c) if syntax::is_ident_start(c) => {
            let (word, _) = syntax::ident(s, "a value")?;
            Ok(match word.as_str() {
                "true" => ParamValue::Bool(true),
                "false" => ParamValue::Bool(false),
                _ => ParamValue::Word(word),
            })
        }
        _ => Ok(match syntax::number(s)?.0 {
            Number::Int(v) => ParamValue::Int(v),
            Number::Float(v) => ParamValue::Float(v),
        }),
    }
}

/// One parsed `name = value` entry with the location of its name.
pub type ParsedParam = (String, ParamValue, Location);

/// Parses `{name = value, ...}` if the next token is `{`; returns an empty list otherwise.
pub fn parse_param_block(s: &mut StateStream) -> PResult<Vec<ParsedParam>> {
    let mut params: Vec<ParsedParam> = Vec::new();
    if !syntax::eat(s, '{') {
        return Ok(params);
    }
    if syntax::eat(s, '}') {
        return Ok(params);
    }
    loop {
        let (name, loc) = syntax::ident(s, "a parameter name")?;
        if params.iter().any(|(n, _, _)| *n == name) {
            return syntax::error_at(loc, format!("parameter `{name}` is given twice"));
        }
        syntax::expect(s, '=', &format!("after parameter `{name}`"))?;
        let value = parse_value(s)?;
        params.push((name, value, loc));
        if syntax::eat(s, '}') {
            return Ok(params);
        }
        syntax::expect(s, ',', "or `}` after a parameter")?;
    }
}

/// Prints `{a = 1, b = true}`, or nothing when `params` is empty.
pub fn print_param_block<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a ParamValue)>,
) -> String {
    let body: Vec<String> = params
        .into_iter()
        .map(|(name, value)| format!("{name} = {value}"))
        .collect();
    if body.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", body.join(", "))
    }
}

/// A [`ParamValue`] stored as a pliron attribute (`llm.param`).
#[pliron_attr(name = "llm.param", verifier = "succ")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParamAttr(pub ParamValue);

impl Printable for ParamAttr {
    fn fmt(
        &self,
        _ctx: &Context,
        _state: &printable::State,
        f: &mut fmt::Formatter<'_>,
    ) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Parsable for ParamAttr {
    type Arg = ();
    type Parsed = Self;

    fn parse<'a>(s: &mut StateStream<'a>, _arg: ()) -> ParseResult<'a, Self> {
        match parse_value(s) {
            Ok(v) => Ok(ParamAttr(v)).into_parse_result(),
            Err(e) => Err(e),
        }
    }
}

/// The attribute-dictionary key under which parameter `name` is stored.
pub fn param_key(name: &str) -> Identifier {
    Identifier::try_from(format!("llm_{name}")).expect("parameter names are identifiers")
}

/// The kind of value a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// An integer.
    Int,
    /// A float; integers are accepted and widened.
    Float,
    /// A boolean.
    Bool,
    /// A quoted string.
    Str,
    /// One of the listed bare words.
    Word(&'static [&'static str]),
    /// A list of integers.
    IntList,
    /// A list of bare words.
    WordList,
    /// A number or a list of numbers.
    Numbers,
}

impl ParamKind {
    /// Describes the kind for diagnostics.
    pub fn describe(self) -> String {
        match self {
            ParamKind::Int => "an integer".into(),
            ParamKind::Float => "a float".into(),
            ParamKind::Bool => "a boolean".into(),
            ParamKind::Str => "a string".into(),
            ParamKind::Word(words) => format!("one of {}", words.join(", ")),
            ParamKind::IntList => "a list of integers".into(),
            ParamKind::WordList => "a list of names".into(),
            ParamKind::Numbers => "a number or a list of numbers".into(),
        }
    }

    /// Whether `value` is of this kind.
    pub fn accepts(self, value: &ParamValue) -> bool {
        match (self, value) {
            (ParamKind::Int, ParamValue::Int(_)) => true,
            (ParamKind::Float, ParamValue::Float(_) | ParamValue::Int(_)) => true,
            (ParamKind::Bool, ParamValue::Bool(_)) => true,
            (ParamKind::Str, ParamValue::Str(_)) => true,
            (ParamKind::Word(words), ParamValue::Word(w)) => words.contains(&w.as_str()),
            (ParamKind::IntList, v) => v.as_int_list().is_some(),
            (ParamKind::WordList, v) => v.as_word_list().is_some(),
            (ParamKind::Numbers, ParamValue::Int(_) | ParamValue::Float(_)) => true,
            (ParamKind::Numbers, ParamValue::List(items)) => {
                items.iter().all(|v| v.as_number().is_some())
            }
            _ => false,
        }
    }
}

/// The declaration of one parameter of an op.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// Name as written in the text.
    pub name: &'static str,
    /// Accepted values.
    pub kind: ParamKind,
    /// Whether the parameter must be present.
    pub required: bool,
}

impl ParamSpec {
    /// A required parameter.
    pub const fn required(name: &'static str, kind: ParamKind) -> Self {
        ParamSpec {
            name,
            kind,
            required: true,
        }
    }

    /// An optional parameter.
    pub const fn optional(name: &'static str, kind: ParamKind) -> Self {
        ParamSpec {
            name,
            kind,
            required: false,
        }
    }
}

/// Checks `value` against `spec`, returning the message for a mismatch.
pub fn check_param(op_name: &str, spec: &ParamSpec, value: &ParamValue) -> Result<(), String> {
    if spec.kind.accepts(value) {
        Ok(())
    } else {
        Err(format!(
            "{op_name}: parameter `{}` expects {}, found {} `{value}`",
            spec.name,
            spec.kind.describe(),
            value.kind_name()
        ))
    }
}
