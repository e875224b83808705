//! Reading and writing `llm` IR text: comment stripping, parsing with verification, located
//! diagnostics, and deterministic printing.
//!
//! # Deterministic printing
//!
//! pliron prints a value as `<given name>_v<context-global id>`, so raw output changes with
//! unrelated edits and never reaches a fixed point (parsing `x_v3` gives the name `x_v3`,
//! printed `x_v3_v9`). [`print_module`] instead names every value and block in order of first
//! appearance: a value keeps the name it was given (`x`) unless that name looks generated
//! (`v12`), in which case it becomes `v0`, `v1`, ...; blocks keep their label or become `bb0`,
//! `bb1`, .... Names are unique within each function (and against the module's own block
//! labels): a taken name gets a suffix (`x_1`, `x_2`).
//! So print -> parse -> print is a byte-for-byte fixed point.
//!
//! # Comments
//!
//! `//` starts a comment that runs to the end of the line (outside string literals). Comments
//! are blanked with spaces before parsing, so line and column numbers stay those of the file.

use std::collections::{HashMap, HashSet};

use pliron::{
    basic_block::BasicBlock,
    builtin::{
        given_names,
        ops::{FuncOp, ModuleOp},
    },
    combine::{Parser, eof, parser::char::spaces},
    common_traits::Named,
    context::{Context, Ptr},
    graph::walkers::{IRNode, WALKCONFIG_PREORDER_FORWARD, uninterruptible::immutable::walk_op},
    identifier::Identifier,
    location::{self, Location},
    operation::{self, Operation},
    parsable::parse_from_str,
    printable::Printable,
    result::Error,
    value::Value,
};

/// An error located in the input text (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// What is wrong, on one line.
    pub message: String,
}

impl Diagnostic {
    /// Renders the diagnostic as `FILE:LINE:COL: error: MESSAGE` (`FILE: error: MESSAGE`
    /// for line 0, which marks a problem with no position in the input).
    pub fn render(&self, file: &str) -> String {
        if self.line == 0 {
            format!("{file}: error: {}", self.message)
        } else {
            format!(
                "{file}:{}:{}: error: {}",
                self.line, self.column, self.message
            )
        }
    }

    /// Converts a pliron error, taking its location and flattening its message to one line.
    pub fn from_pliron(err: &Error) -> Diagnostic {
        let (line, column) = match err.loc() {
            Location::SrcPos { pos, .. } => (pos.line.max(1) as u32, pos.column.max(1) as u32),
            _ => (1, 1),
        };
        let raw = err.err.to_string();
        let parts: Vec<String> = raw
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Parse error at"))
            .map(|l| {
                let mut chars = l.chars();
                match chars.next() {
                    Some(c) => c.to_lowercase().chain(chars).collect(),
                    None => String::new(),
                }
            })
            .collect();
        let message = if parts.is_empty() {
            err.kind.to_string()
        } else {
            parts.join("; ")
        };
        Diagnostic {
            line,
            column,
            message,
        }
    }
}

/// Decodes UTF-8, reporting the line and column of the first invalid byte.
pub fn decode_utf8(bytes: &[u8]) -> Result<&str, Diagnostic> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
        let (line, column) = position_of_end(valid);
        Diagnostic {
            line,
            column,
            message: format!(
                "input is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        }
    })
}

/// Line and column just after `text`.
fn position_of_end(text: &str) -> (u32, u32) {
    let line = text.matches('\n').count() as u32 + 1;
    let column = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u32 + 1;
    (line, column)
}

/// Replaces every `//` comment (outside string literals) with spaces, keeping positions.
pub fn blank_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut in_comment, mut escaped) = (false, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            in_comment = false;
            in_string = false;
            out.push(c);
            continue;
        }
        if in_comment {
            out.push(if c == '\t' { '\t' } else { ' ' });
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            out.push(c);
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            in_comment = true;
            out.push(' ');
            continue;
        }
        out.push(c);
    }
    out
}

/// Rejects non-ASCII characters outside string literals.
///
/// Identifiers are ASCII; pliron's identifier parser accepts any Unicode letter and then
/// panics when it builds the identifier, so such input must not reach it.
fn check_ascii(text: &str) -> Result<(), Diagnostic> {
    let (mut line, mut column) = (1u32, 1u32);
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' || c == '\n' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if !c.is_ascii() {
            return Err(Diagnostic {
                line,
                column,
                message: format!("unexpected non-ASCII character `{c}` outside a string literal"),
            });
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    Ok(())
}

/// Parses and verifies a `builtin.module` from `text` (comments allowed).
pub fn parse_module(ctx: &mut Context, text: &str) -> Result<ModuleOp, Diagnostic> {
    let text = blank_comments(text);
    if text.trim().is_empty() {
        return Err(Diagnostic {
            line: 1,
            column: 1,
            message: "empty input: expected a builtin.module".into(),
        });
    }
    check_ascii(&text)?;
    // pliron's parser opens the first value scope inside the top-level op's region, so a
    // top-level op with operands would panic there: require `builtin.module` up front.
    let start = text.len() - text.trim_start().len();
    let first: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
        .collect();
    if first != "builtin.module" {
        let (line, column) = position_of_end(&text[..start]);
        let found = if first.is_empty() {
            text[start..]
                .chars()
                .next()
                .map(|c| format!("`{c}`"))
                .unwrap_or_default()
        } else {
            format!("`{first}`")
        };
        return Err(Diagnostic {
            line,
            column,
            message: format!("expected a top-level builtin.module, found {found}"),
        });
    }
    // The module must be the whole input: nothing may follow it.
    let whole = Operation::top_level_parser().skip(spaces()).skip(eof());
    let op = parse_from_str(whole, ctx, &text).map_err(|e| Diagnostic::from_pliron(&e))?;
    let Some(module) = Operation::get_op::<ModuleOp>(op, ctx) else {
        let found = Operation::get_opid(op, ctx);
        return Err(Diagnostic {
            line: 1,
            column: 1,
            message: format!("the top-level op must be builtin.module, found {found}"),
        });
    };
    operation::verify_operation(op, ctx).map_err(|e| Diagnostic::from_pliron(&e))?;
    Ok(module)
}

/// Every op, region and block nested in `root` (and `root` itself), in pre-order.
pub fn preorder(ctx: &Context, root: Ptr<Operation>) -> Vec<IRNode> {
    let mut nodes: Vec<IRNode> = Vec::new();
    walk_op(
        ctx,
        &mut nodes,
        &WALKCONFIG_PREORDER_FORWARD,
        root,
        |_, nodes, node| nodes.push(node),
    );
    nodes
}

/// Whether `name` has the shape of a generated name (`v12`, `bb3`).
fn is_generated(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Picks stable names for values and blocks in order of first appearance.
#[derive(Default)]
struct Namer {
    used: HashSet<String>,
    next_value: usize,
    next_block: usize,
}

impl Namer {
    fn pick(
        &mut self,
        given: Option<String>,
        prefix: &str,
        counter: fn(&mut Self) -> &mut usize,
    ) -> String {
        if let Some(name) = given.filter(|n| !is_generated(n, prefix)) {
            let mut candidate = name.clone();
            let mut k = 1;
            while self.used.contains(&candidate) {
                candidate = format!("{name}_{k}");
                k += 1;
            }
            self.used.insert(candidate.clone());
            return candidate;
        }
        loop {
            let n = counter(self);
            let candidate = format!("{prefix}{n}");
            *counter(self) += 1;
            if self.used.insert(candidate.clone()) {
                return candidate;
            }
        }
    }
}

/// Prints `module` with stable names and no location annotations.
///
/// Locations and given names are not part of the printed form; they are set aside while
/// printing and restored afterwards, so the module is unchanged.
pub fn print_module(ctx: &Context, module: ModuleOp) -> String {
    let root = pliron::op::Op::get_operation(&module);
    let nodes = preorder(ctx, root);
    let mut namer = Namer::default();
    let mut values: Vec<(Value, String)> = Vec::new();
    let mut blocks: Vec<(Ptr<BasicBlock>, String)> = Vec::new();
    let value_counter: fn(&mut Namer) -> &mut usize = |n| &mut n.next_value;
    let block_counter: fn(&mut Namer) -> &mut usize = |n| &mut n.next_block;
    // Each function is its own naming scope (its region is isolated from above).
    let mut module_names: Option<HashSet<String>> = None;
    for node in &nodes {
        if let IRNode::Operation(op) = node
            && Operation::get_op::<FuncOp>(*op, ctx).is_some()
        {
            let outer = module_names
                .get_or_insert_with(|| namer.used.clone())
                .clone();
            namer = Namer {
                used: outer,
                ..Namer::default()
            };
        }
        match node {
            IRNode::BasicBlock(block) => {
                let label = block.deref(ctx).given_name(ctx).map(|l| l.to_string());
                blocks.push((*block, namer.pick(label, "bb", block_counter)));
                let args: Vec<Value> = block.deref(ctx).arguments().collect();
                for arg in args {
                    let given = arg.given_name(ctx).map(|n| n.to_string());
                    values.push((arg, namer.pick(given, "v", value_counter)));
                }
            }
            IRNode::Operation(op) => {
                let results: Vec<Value> = op.deref(ctx).results().collect();
                for res in results {
                    let given = res.given_name(ctx).map(|n| n.to_string());
                    values.push((res, namer.pick(given, "v", value_counter)));
                }
            }
            IRNode::Region(_) => {}
        }
    }
    let saved = SavedAnnotations::save(ctx, &nodes);
    given_names::erase_given_names(ctx, root);
    location::erase_locations(ctx, root);
    let mut rename: HashMap<String, String> = HashMap::new();
    for (value, name) in values {
        rename.insert(value.unique_name(ctx).to_string(), name);
    }
    for (block, name) in blocks {
        rename.insert(block.deref(ctx).unique_name(ctx).to_string(), name);
    }
    let raw = root.disp(ctx).to_string();
    saved.restore(ctx);
    let mut text: String = rename_identifiers(&raw, &rename)
        .lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect();
    if text.is_empty() {
        text.push('\n');
    }
    text
}

/// The locations and given names of a module, kept while printing erases them.
struct SavedAnnotations {
    ops: Vec<(Ptr<Operation>, Location, Vec<Option<Identifier>>)>,
    blocks: Vec<SavedBlock>,
}

/// A block's location, label and argument names.
type SavedBlock = (
    Ptr<BasicBlock>,
    Location,
    Option<Identifier>,
    Vec<Option<Identifier>>,
);

impl SavedAnnotations {
    fn save(ctx: &Context, nodes: &[IRNode]) -> SavedAnnotations {
        let mut saved = SavedAnnotations {
            ops: Vec::new(),
            blocks: Vec::new(),
        };
        for node in nodes {
            match node {
                IRNode::Operation(op) => {
                    let n = op.deref(ctx).get_num_results();
                    let names = (0..n)
                        .map(|i| given_names::get_operation_result_name(ctx, *op, i))
                        .collect();
                    saved.ops.push((*op, op.deref(ctx).loc().clone(), names));
                }
                IRNode::BasicBlock(block) => {
                    let n = block.deref(ctx).get_num_arguments();
                    let names = (0..n)
                        .map(|i| given_names::get_block_arg_name(ctx, *block, i))
                        .collect();
                    let label = block.deref(ctx).given_name(ctx);
                    saved
                        .blocks
                        .push((*block, block.deref(ctx).loc().clone(), label, names));
                }
                IRNode::Region(_) => {}
            }
        }
        saved
    }

    fn restore(self, ctx: &Context) {
        for (op, loc, names) in self.ops {
            op.deref_mut(ctx).set_loc(loc);
            for (i, name) in names.into_iter().enumerate() {
                given_names::set_operation_result_name(ctx, op, i, name);
            }
        }
        for (block, loc, label, names) in self.blocks {
            block.deref_mut(ctx).set_loc(loc);
            block.deref_mut(ctx).set_label(label);
            for (i, name) in names.into_iter().enumerate() {
                given_names::set_block_arg_name(ctx, block, i, name);
            }
        }
    }
}

/// Replaces whole identifier tokens found in `rename`, skipping strings and `@symbols`.
fn rename_identifiers(text: &str, rename: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            out.extend(&chars[start..i]);
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let token: String = chars[start..i].iter().collect();
            let is_symbol = start > 0 && chars[start - 1] == '@';
            match rename.get(&token) {
                Some(name) if !is_symbol => out.push_str(name),
                _ => out.push_str(&token),
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}
