//! Hand-written lexing and parsing helpers shared by every `llm` type, attribute and op.
//!
//! pliron parses with `combine` over a [`StateStream`]. Our syntax is small and regular, so
//! rather than composing combinators for each construct we read characters through a few
//! recursive-descent helpers. Every helper returns a [`PResult`] whose error carries the
//! source position at which the problem was found, so diagnostics point at the offending token.

use std::fmt::Display;

use pliron::{
    combine::{
        Parser, StreamOnce, easy,
        error::{Commit, Tracked},
        stream::{ResetStream, position::SourcePosition},
    },
    input_error,
    location::Location,
    parsable::{StateStream, StreamLocation},
};

use crate::dtype::DType;

/// The error type of our hand-written parsers: a committed combine error.
pub type PErr = Commit<Tracked<easy::Errors<char, char, SourcePosition>>>;

/// Result of a hand-written parser.
pub type PResult<T> = Result<T, PErr>;

/// A dimension of a shape: `Some(n)` for a static size, `None` for a dynamic one (`?`).
pub type Dim = Option<u64>;

/// Builds a parse error at `loc` with `msg`.
pub fn error_at<T>(loc: Location, msg: impl Display) -> PResult<T> {
    Err(input_error!(loc, "{}", msg).into())
}

/// Builds a parse error at the current position of `s`.
pub fn error_here<T>(s: &StateStream, msg: impl Display) -> PResult<T> {
    error_at(s.loc(), msg)
}

/// Runs a combine parser (for example pliron's `type_parser()`) and converts its result.
pub fn run<'a, P: Parser<StateStream<'a>>>(
    s: &mut StateStream<'a>,
    mut p: P,
) -> PResult<P::Output> {
    match p.parse_stream(s).into_result() {
        Ok((value, _)) => Ok(value),
        Err(Commit::Commit(e)) | Err(Commit::Peek(e)) => Err(Commit::Commit(e)),
    }
}

/// Returns the next character without consuming it.
pub fn peek(s: &mut StateStream) -> Option<char> {
    let checkpoint = s.checkpoint();
    let c = s.uncons().ok();
    // The buffered stream always allows resetting to a checkpoint taken one token back.
    let _ = s.reset(checkpoint);
    c
}

/// Consumes and returns the next character.
pub fn bump(s: &mut StateStream) -> Option<char> {
    s.uncons().ok()
}

/// Skips whitespace.
pub fn skip_ws(s: &mut StateStream) {
    while peek(s).is_some_and(char::is_whitespace) {
        bump(s);
    }
}

/// Skips whitespace, then consumes `c` if it is next. Returns whether it did.
pub fn eat(s: &mut StateStream, c: char) -> bool {
    skip_ws(s);
    if peek(s) == Some(c) {
        bump(s);
        true
    } else {
        false
    }
}

/// Describes the next token for an error message.
fn found(s: &mut StateStream) -> String {
    match peek(s) {
        None => "end of input".to_string(),
        Some(c) => format!("`{c}`"),
    }
}

/// Skips whitespace, then requires `c`.
pub fn expect(s: &mut StateStream, c: char, context: &str) -> PResult<()> {
    if eat(s, c) {
        Ok(())
    } else {
        let what = found(s);
        error_here(s, format!("expected `{c}` {context}, found {what}"))
    }
}

/// Whether `c` may start an identifier.
pub fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

/// Whether `c` may continue an identifier.
pub fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Skips whitespace, then reads an identifier `[A-Za-z_][A-Za-z0-9_]*` and its location.
pub fn ident(s: &mut StateStream, what: &str) -> PResult<(String, Location)> {
    skip_ws(s);
    let loc = s.loc();
    match peek(s) {
        Some(c) if is_ident_start(c) => {}
        _ => {
            let f = found(s);
            return error_here(s, format!("expected {what}, found {f}"));
        }
    }
    let mut name = String::new();
    while let Some(c) = peek(s).filter(|&c| is_ident_char(c)) {
        name.push(c);
        bump(s);
    }
    Ok((name, loc))
}

/// Requires the keyword `kw` (an identifier with exactly that spelling).
pub fn keyword(s: &mut StateStream, kw: &str) -> PResult<()> {
    skip_ws(s);
    let loc = s.loc();
    let (name, _) = ident(s, &format!("`{kw}`"))?;
    if name == kw {
        Ok(())
    } else {
        error_at(loc, format!("expected `{kw}`, found `{name}`"))
    }
}

/// A numeric literal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An integer literal (no `.` and no exponent).
    Int(i64),
    /// A floating-point literal.
    Float(f64),
}

/// Skips whitespace, then reads a decimal integer or floating-point literal.
///
/// Integers must fit in `i64` and floats must be finite; anything else is an
/// out-of-range error at the literal.
pub fn number(s: &mut StateStream) -> PResult<(Number, Location)> {
    skip_ws(s);
    let loc = s.loc();
    let mut text = String::new();
    if matches!(peek(s), Some('-') | Some('+')) {
        text.push(bump(s).unwrap_or('+'));
    }
    let digits = |s: &mut StateStream, text: &mut String| {
        let mut n = 0;
        while let Some(c) = peek(s).filter(char::is_ascii_digit) {
            text.push(c);
            bump(s);
            n += 1;
        }
        n
    };
    if digits(s, &mut text) == 0 {
        let f = found(s);
        return error_at(loc, format!("expected a number, found {f}"));
    }
    let mut is_float = false;
    if peek(s) == Some('.') {
        is_float = true;
        text.push('.');
        bump(s);
        if digits(s, &mut text) == 0 {
            return error_here(s, "expected digits after `.` in a number");
        }
    }
    if matches!(peek(s), Some('e') | Some('E')) {
        is_float = true;
        text.push('e');
        bump(s);
        if matches!(peek(s), Some('-') | Some('+')) {
            text.push(bump(s).unwrap_or('+'));
        }
        if digits(s, &mut text) == 0 {
            return error_here(s, "expected digits in the exponent of a number");
        }
    }
    if is_float {
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok((Number::Float(v), loc)),
            _ => error_at(
                loc,
                format!("floating-point literal `{text}` is out of range"),
            ),
        }
    } else {
        match text.parse::<i64>() {
            Ok(v) => Ok((Number::Int(v), loc)),
            Err(_) => error_at(
                loc,
                format!("integer literal `{text}` is out of range for i64"),
            ),
        }
    }
}

/// Skips whitespace, then reads a non-negative integer that fits `u64` (a size or count).
pub fn size(s: &mut StateStream, what: &str) -> PResult<u64> {
    skip_ws(s);
    let loc = s.loc();
    match number(s)? {
        (Number::Int(v), _) if v >= 0 => Ok(v as u64),
        (Number::Int(v), _) => error_at(loc, format!("{what} must be non-negative, found {v}")),
        (Number::Float(v), _) => error_at(loc, format!("{what} must be an integer, found {v:?}")),
    }
}

/// Skips whitespace, then reads a double-quoted string with `\"`, `\\`, `\n` and `\t` escapes.
pub fn string(s: &mut StateStream) -> PResult<String> {
    skip_ws(s);
    let loc = s.loc();
    if peek(s) != Some('"') {
        let f = found(s);
        return error_here(s, format!("expected a string, found {f}"));
    }
    bump(s);
    let mut out = String::new();
    loop {
        match bump(s) {
            None | Some('\n') => return error_at(loc, "unterminated string literal"),
            Some('"') => return Ok(out),
            Some('\\') => match bump(s) {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                other => {
                    let shown = other.map_or("end of input".to_string(), |c| format!("`\\{c}`"));
                    return error_here(s, format!("unknown escape {shown} in string"));
                }
            },
            Some(c) => out.push(c),
        }
    }
}

/// Writes `text` as a double-quoted string that [`string`] reads back.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Largest static dimension accepted by the parser (2^48): keeps element counts and byte
/// sizes of any shape far from `u64` overflow.
pub const MAX_DIM: u64 = 1 << 48;

/// Reads a dimension list `4x?x8` followed by `x`-separated suffix.
///
/// Returns the dims and, when `with_dtype` is set, the element type that ends the list
/// (`4x8xf32`; a rank-0 tensor is just `f32`).
pub fn shape(s: &mut StateStream, with_dtype: bool) -> PResult<(Vec<Dim>, Option<DType>)> {
    skip_ws(s);
    let mut dims = Vec::new();
    loop {
        let loc = s.loc();
        match peek(s) {
            Some('?') => {
                bump(s);
                dims.push(None);
            }
            Some(c) if c.is_ascii_digit() => {
                let mut text = String::new();
                while let Some(c) = peek(s).filter(char::is_ascii_digit) {
                    text.push(c);
                    bump(s);
                }
                match text.parse::<u64>() {
                    Ok(v) if v <= MAX_DIM => dims.push(Some(v)),
                    _ => {
                        return error_at(
                            loc,
                            format!("dimension `{text}` is out of range (max 2^48)"),
                        );
                    }
                }
            }
            Some(c) if with_dtype && is_ident_start(c) => {
                let (name, loc) = ident(s, "an element type")?;
                return match DType::from_name(&name) {
                    Some(d) => Ok((dims, Some(d))),
                    None => error_at(loc, format!("unknown element type `{name}`")),
                };
            }
            _ => {
                if with_dtype || dims.is_empty() {
                    let f = found(s);
                    let want = if with_dtype {
                        "a dimension or element type"
                    } else {
                        "a dimension"
                    };
                    return error_here(s, format!("expected {want}, found {f}"));
                }
                return Ok((dims, None));
            }
        }
        if peek(s) == Some('x') {
            bump(s);
        } else if with_dtype {
            let f = found(s);
            return error_here(s, format!("expected `x` after a dimension, found {f}"));
        } else {
            return Ok((dims, None));
        }
    }
}

/// Prints a shape as `4x?x8` (no trailing `x`).
pub fn print_dims(dims: &[Dim]) -> String {
    dims.iter()
        .map(|d| d.map_or("?".to_string(), |n| n.to_string()))
        .collect::<Vec<_>>()
        .join("x")
}

/// Prints an `f64` so that [`number`] reads back exactly the same value as a float.
pub fn print_float(v: f64) -> String {
    // `{:?}` prints the shortest representation that round-trips, always with `.` or `e`.
    format!("{v:?}")
}
