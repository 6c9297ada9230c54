//! The part of Go's text/template and of Helm's template functions that
//! deploy/helm/rayfence uses, evaluated the way helm evaluates it, because no helm
//! binary is available where the tests run. Must not: guess. A construct, a
//! function or a value it does not know is an error naming it, so a template that
//! grows a new construct fails here instead of rendering differently from helm.
//!
//! Actions:
//! - `{{ pipeline }}`: prints a string, a number or a boolean as Go prints it
//!   (a map, a list or nothing at all is an error: use `toYaml`);
//! - `{{ if p }}` / `{{ else if p }}` / `{{ else }}` / `{{ end }}` (Go truthiness);
//! - `{{ define "name" }}` ... `{{ end }}` at the top of a file (shared by every
//!   file, as helm shares them) and `{{/* comments */}}`;
//! - `{{-` / `-}}` trim the whitespace before / after the action, as in Go.
//!
//! No variables, `range`, `with` or `template`.
//!
//! Pipelines: `.` and `.A.B` fields of the dot (a missing key is an error: helm
//! would print nothing), string, integer and boolean literals, `( ... )`, and
//! `a | f x` (the value goes last). Functions, with Helm's (sprig's) meaning:
//! `include`, `default`, `required`, `toYaml`, `nindent`, `indent`, `trunc`,
//! `trimSuffix`, `replace`, `contains`, `printf` (`%s %d %v %q %%`), `quote`,
//! `join`, `int64`, `not`, `and`, `or`, `eq`, `ne`.
//!
//! Numbers: helm reads values files into float64, and Go prints a float64 of a
//! million or more in exponent form (`1.048576e+06`): [`helm_numbers`] makes a
//! value tree read that way, so a template printing a large count without `int64`
//! fails its test as it would fail in a cluster.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Number, Value};

/// Parsed template files and the named templates they define.
#[derive(Default)]
pub struct Templates {
    files: BTreeMap<String, Vec<Node>>,
    defines: BTreeMap<String, Vec<Node>>,
}

enum Node {
    Text(String),
    Print(Pipeline),
    If {
        branches: Vec<(Pipeline, Vec<Node>)>,
        otherwise: Vec<Node>,
    },
}

/// Commands joined by `|`.
type Pipeline = Vec<Command>;

/// A function and its arguments, or one operand.
struct Command {
    words: Vec<Term>,
}

enum Term {
    Dot,
    Field(Vec<String>),
    Str(String),
    Int(i64),
    Bool(bool),
    Function(String),
    Sub(Pipeline),
}

/// How deep `include` may nest (a template including itself is a mistake).
const MAX_DEPTH: usize = 32;

impl Templates {
    /// Parses one file and keeps its `define`s beside the others'.
    pub fn add(&mut self, name: &str, text: &str) -> Result<()> {
        let pieces = split(text).with_context(|| name.to_owned())?;
        let mut pieces = pieces.into_iter();
        let (nodes, end) = parse_list(&mut pieces, Some(&mut self.defines), name)?;
        match end {
            Stop::Eof => {}
            Stop::End => bail!("{name}: {{{{ end }}}} without if or define"),
            Stop::Else(_) => bail!("{name}: {{{{ else }}}} without if"),
        }
        self.files.insert(name.to_owned(), nodes);
        Ok(())
    }

    /// The file `name` rendered with `dot` (`.Values`, `.Release`, `.Chart`).
    pub fn render(&self, name: &str, dot: &Value) -> Result<String> {
        let nodes = self
            .files
            .get(name)
            .ok_or_else(|| anyhow!("no template file {name}"))?;
        let mut out = String::new();
        self.exec(nodes, dot, &mut out, 0)
            .with_context(|| name.to_owned())?;
        Ok(out)
    }

    fn exec(&self, nodes: &[Node], dot: &Value, out: &mut String, depth: usize) -> Result<()> {
        for node in nodes {
            match node {
                Node::Text(text) => out.push_str(text),
                Node::Print(p) => out.push_str(&print(&self.pipeline(p, dot, depth)?)?),
                Node::If {
                    branches,
                    otherwise,
                } => {
                    let mut taken = None;
                    for (condition, body) in branches {
                        if truthy(&self.pipeline(condition, dot, depth)?) {
                            taken = Some(body);
                            break;
                        }
                    }
                    self.exec(taken.unwrap_or(otherwise), dot, out, depth)?;
                }
            }
        }
        Ok(())
    }

    fn pipeline(&self, p: &Pipeline, dot: &Value, depth: usize) -> Result<Value> {
        let mut piped = None;
        for command in p {
            piped = Some(self.command(command, dot, piped, depth)?);
        }
        piped.ok_or_else(|| anyhow!("empty pipeline"))
    }

    fn command(
        &self,
        command: &Command,
        dot: &Value,
        piped: Option<Value>,
        depth: usize,
    ) -> Result<Value> {
        let (first, rest) = command
            .words
            .split_first()
            .ok_or_else(|| anyhow!("empty command"))?;
        if let Term::Field(path) = first
            && path == &["Files", "Get"]
        {
            // `.Files.Get "files/x"`, the one method the chart calls: the file as it
            // is, not a template (a missing file is an error here; helm gives "").
            ensure!(
                rest.len() == 1 && piped.is_none(),
                ".Files.Get takes one path"
            );
            let wanted = self.term(&rest[0], dot, depth)?;
            let wanted = string(&wanted)?;
            return dot["Files"]
                .get(wanted)
                .cloned()
                .ok_or_else(|| anyhow!("the chart has no file {wanted}"));
        }
        let Term::Function(name) = first else {
            ensure!(
                rest.is_empty() && piped.is_none(),
                "only a function takes arguments"
            );
            return self.term(first, dot, depth);
        };
        let mut args = rest
            .iter()
            .map(|t| self.term(t, dot, depth))
            .collect::<Result<Vec<_>>>()?;
        args.extend(piped);
        self.call(name, args, depth)
            .with_context(|| format!("in {name}"))
    }

    fn term(&self, term: &Term, dot: &Value, depth: usize) -> Result<Value> {
        Ok(match term {
            Term::Dot => dot.clone(),
            Term::Field(path) => {
                let mut at = dot;
                for (i, key) in path.iter().enumerate() {
                    let so_far = || format!(".{}", path[..=i].join("."));
                    at = at
                        .as_object()
                        .ok_or_else(|| anyhow!("{} is not a map", so_far()))?
                        .get(key)
                        .ok_or_else(|| missing(&so_far()))?;
                }
                at.clone()
            }
            Term::Str(s) => Value::String(s.clone()),
            Term::Int(i) => Value::from(*i),
            Term::Bool(b) => Value::Bool(*b),
            Term::Function(name) => self.call(name, Vec::new(), depth)?,
            Term::Sub(p) => self.pipeline(p, dot, depth)?,
        })
    }

    fn call(&self, name: &str, args: Vec<Value>, depth: usize) -> Result<Value> {
        let arity = |n: usize| -> Result<()> {
            ensure!(
                args.len() == n,
                "{name} takes {n} arguments, got {}",
                args.len()
            );
            Ok(())
        };
        Ok(match name {
            "include" => {
                arity(2)?;
                let template = string(&args[0])?;
                let nodes = self
                    .defines
                    .get(template)
                    .ok_or_else(|| anyhow!("no template {template:?} is defined"))?;
                ensure!(depth < MAX_DEPTH, "include nests deeper than {MAX_DEPTH}");
                let mut out = String::new();
                self.exec(nodes, &args[1], &mut out, depth + 1)
                    .with_context(|| format!("in template {template:?}"))?;
                Value::String(out)
            }
            "default" => {
                arity(2)?;
                let [fallback, given] = <[Value; 2]>::try_from(args).unwrap();
                if empty(&given) { fallback } else { given }
            }
            "required" => {
                arity(2)?;
                if args[1].is_null() || args[1] == "" {
                    bail!("{}", string(&args[0])?);
                }
                args[1].clone()
            }
            "toYaml" => {
                arity(1)?;
                let yaml = serde_norway::to_string(&json_numbers(&args[0]))?;
                Value::String(yaml.trim_end_matches('\n').to_owned())
            }
            "indent" | "nindent" => {
                arity(2)?;
                let pad = " ".repeat(usize::try_from(int(&args[0])?)?);
                let indented = format!(
                    "{pad}{}",
                    string(&args[1])?.replace('\n', &format!("\n{pad}"))
                );
                Value::String(if name == "nindent" {
                    format!("\n{indented}")
                } else {
                    indented
                })
            }
            "trunc" => {
                arity(2)?;
                let n = usize::try_from(int(&args[0])?).context("a negative trunc")?;
                Value::String(string(&args[1])?.chars().take(n).collect())
            }
            "trimSuffix" => {
                arity(2)?;
                let s = string(&args[1])?;
                Value::String(s.strip_suffix(string(&args[0])?).unwrap_or(s).to_owned())
            }
            "replace" => {
                arity(3)?;
                Value::String(string(&args[2])?.replace(string(&args[0])?, string(&args[1])?))
            }
            "contains" => {
                arity(2)?;
                Value::Bool(string(&args[1])?.contains(string(&args[0])?))
            }
            "printf" => {
                let (format, rest) = args
                    .split_first()
                    .ok_or_else(|| anyhow!("printf needs a format"))?;
                Value::String(printf(string(format)?, rest)?)
            }
            "quote" => {
                ensure!(!args.is_empty(), "quote needs a value");
                let quoted = args
                    .iter()
                    .map(|a| Ok(serde_json::to_string(&print(a)?)?))
                    .collect::<Result<Vec<_>>>()?;
                Value::String(quoted.join(" "))
            }
            "join" => {
                arity(2)?;
                let items = args[1]
                    .as_array()
                    .ok_or_else(|| anyhow!("join of a non-list {}", args[1]))?;
                let items = items.iter().map(print).collect::<Result<Vec<_>>>()?;
                Value::String(items.join(string(&args[0])?))
            }
            "int64" => {
                arity(1)?;
                Value::from(match &args[0] {
                    Value::Number(n) if n.is_f64() => n.as_f64().unwrap().trunc() as i64,
                    Value::Number(n) => n.as_i64().ok_or_else(|| anyhow!("{n} overflows"))?,
                    Value::String(s) => s.parse().with_context(|| format!("int64 {s:?}"))?,
                    other => bail!("int64 of {other}"),
                })
            }
            "not" => {
                arity(1)?;
                Value::Bool(!truthy(&args[0]))
            }
            // Go's: the first falsy (and) / truthy (or) argument, else the last.
            "and" | "or" => {
                ensure!(args.len() >= 2, "{name} takes two or more arguments");
                let stop = name == "or";
                let at = args
                    .iter()
                    .position(|a| truthy(a) == stop)
                    .unwrap_or(args.len() - 1);
                args[at].clone()
            }
            "eq" | "ne" => {
                arity(2)?;
                let same = match (&args[0], &args[1]) {
                    (Value::Number(a), Value::Number(b)) => {
                        ensure!(
                            a.is_f64() == b.is_f64(),
                            "eq of a float and an integer (Go refuses to compare them)"
                        );
                        a.as_f64() == b.as_f64()
                    }
                    (a @ (Value::String(_) | Value::Bool(_)), b)
                        if std::mem::discriminant(a) == std::mem::discriminant(b) =>
                    {
                        a == b
                    }
                    (a, b) => bail!("cannot compare {a} and {b}"),
                };
                Value::Bool(same == (name == "eq"))
            }
            other => {
                bail!("unsupported template function {other:?} (see tests/src/deploy/template.rs)")
            }
        })
    }
}

fn missing(path: &str) -> anyhow::Error {
    match path.strip_prefix(".Values.") {
        Some(value) => anyhow!("values.yaml has no {value}"),
        None => anyhow!("{path} does not exist"),
    }
}

/// A value tree with every number a float64, as helm reads a values file.
pub fn helm_numbers(v: &Value) -> Value {
    match v {
        Value::Number(n) => Number::from_f64(n.as_f64().expect("a finite number"))
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.iter().map(helm_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), helm_numbers(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Whole floats as integers, as helm's toYaml writes them (through JSON, which
/// writes 1048576.0 as 1048576).
fn json_numbers(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap();
            if f.fract() == 0.0 && f.abs() < 1e15 {
                Value::from(f as i64)
            } else {
                v.clone()
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(json_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), json_numbers(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A value as `{{ }}` prints it: strings as is, numbers and booleans as Go does.
pub fn print(v: &Value) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_f64() => go_float(n.as_f64().unwrap()),
        Value::Number(n) => n.to_string(),
        Value::Null => bail!("a missing value prints nothing in helm (set it, or use default)"),
        other => bail!("{other} is not a scalar (use toYaml)"),
    })
}

/// Go's `%v` of a float64: the shortest digits, in exponent form from 1e+06 on
/// or below 1e-04 (strconv's 'g' with the shortest precision).
fn go_float(f: f64) -> String {
    // Rust's shortest exponent form is "1.048576e6"; Go writes "1.048576e+06".
    let rust = format!("{f:e}");
    let (mantissa, exponent) = rust.split_once('e').expect("exponent form");
    let exponent: i32 = exponent.parse().expect("exponent");
    if f == 0.0 || (-4..6).contains(&exponent) {
        return format!("{f}");
    }
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

fn printf(format: &str, args: &[Value]) -> Result<String> {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars.next().ok_or_else(|| anyhow!("printf: a lone %"))?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = args
            .next()
            .ok_or_else(|| anyhow!("printf: too few arguments for {format:?}"))?;
        match (verb, arg) {
            ('s', Value::String(s)) => out.push_str(s),
            ('d', Value::Number(n)) if !n.is_f64() => out.push_str(&n.to_string()),
            ('v', _) => out.push_str(&print(arg)?),
            ('q', Value::String(s)) => out.push_str(&serde_json::to_string(s)?),
            (verb, arg) => bail!("printf: %{verb} of {arg} (Go prints %!{verb}(...))"),
        }
    }
    ensure!(
        args.next().is_none(),
        "printf: more arguments than {format:?} uses"
    );
    Ok(out)
}

fn string(v: &Value) -> Result<&str> {
    v.as_str().ok_or_else(|| anyhow!("{v} is not a string"))
}

fn int(v: &Value) -> Result<i64> {
    v.as_i64()
        .filter(|_| !v.as_number().is_some_and(Number::is_f64))
        .ok_or_else(|| anyhow!("{v} is not an integer"))
}

/// Go's truthiness (`if`, `and`, `or`, `not`).
fn truthy(v: &Value) -> bool {
    !empty(v)
}

/// sprig's `empty` (what `default` replaces): nothing, false, 0, "", [] and {}.
fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A template as text and actions, `(is_action, text)`, with the trim markers
/// applied and comments dropped.
fn split(template: &str) -> Result<Vec<(bool, String)>> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = rest[..open].to_owned();
        if trim_next {
            text = text.trim_start().to_owned();
        }
        let after = &rest[open + 2..];
        let comment = after.starts_with("/*") || after.starts_with("- /*");
        let close = action_end(after)?;
        let mut action = &after[..close];
        // Go's trim markers need the space: "{{-3}}" is the number -3.
        if let Some(a) = action.strip_prefix('-') {
            ensure!(
                a.starts_with(char::is_whitespace),
                "{{{{-{a}}}}}: a trim marker needs a space after it"
            );
            text = text.trim_end().to_owned();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            ensure!(
                a.ends_with(char::is_whitespace),
                "{{{{{a}-}}}}: a trim marker needs a space before it"
            );
            trim_next = true;
            action = a;
        }
        pieces.push((false, text));
        if !comment {
            pieces.push((true, action.trim().to_owned()));
        }
        rest = &after[close + 2..];
    }
    let mut tail = rest.to_owned();
    if trim_next {
        tail = tail.trim_start().to_owned();
    }
    pieces.push((false, tail));
    Ok(pieces)
}

/// Where `}}` closes the action that starts `text`, past any quoted `}}`.
fn action_end(text: &str) -> Result<usize> {
    // A comment may hold anything but "*/"; Go wants it right at the delimiter
    // ("{{/*") or after a trim marker ("{{- /*").
    if let Some(comment) = text
        .strip_prefix("/*")
        .or_else(|| text.strip_prefix("- /*"))
    {
        let end = comment
            .find("*/")
            .ok_or_else(|| anyhow!("unclosed comment"))?;
        let after_comment = text.len() - comment.len() + end + 2;
        let after = &text[after_comment..];
        if after.starts_with("}}") {
            return Ok(after_comment);
        }
        if after.starts_with(" -}}") {
            return Ok(after_comment + 2);
        }
        bail!("a comment must end right at the delimiter (\"*/}}}}\" or \"*/ -}}}}\")");
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut quote = None;
    while i < bytes.len() {
        match (quote, bytes[i]) {
            (None, b'"' | b'`') => quote = Some(bytes[i]),
            (Some(b'"'), b'\\') => i += 1,
            (Some(q), c) if c == q => quote = None,
            (None, b'}') if bytes.get(i + 1) == Some(&b'}') => return Ok(i),
            _ => {}
        }
        i += 1;
    }
    bail!("unclosed {{{{")
}

/// What ended a list of nodes.
enum Stop {
    Eof,
    End,
    Else(Option<Pipeline>),
}

fn parse_list(
    pieces: &mut std::vec::IntoIter<(bool, String)>,
    mut defines: Option<&mut BTreeMap<String, Vec<Node>>>,
    file: &str,
) -> Result<(Vec<Node>, Stop)> {
    let mut nodes = Vec::new();
    while let Some((is_action, piece)) = pieces.next() {
        if !is_action {
            if !piece.is_empty() {
                nodes.push(Node::Text(piece));
            }
            continue;
        }
        let context = || format!("{file}: {{{{ {piece} }}}}");
        let mut words = piece.splitn(2, char::is_whitespace);
        let keyword = words.next().unwrap_or_default();
        let rest = words.next().unwrap_or_default().trim();
        match keyword {
            "end" if rest.is_empty() => return Ok((nodes, Stop::End)),
            "else" if rest.is_empty() => return Ok((nodes, Stop::Else(None))),
            "else" => {
                let condition = rest
                    .strip_prefix("if ")
                    .ok_or_else(|| anyhow!("{}: only else if", context()))?;
                let condition = parse_pipeline(condition).with_context(context)?;
                return Ok((nodes, Stop::Else(Some(condition))));
            }
            "if" => {
                let mut branches = Vec::new();
                let mut condition = parse_pipeline(rest).with_context(context)?;
                let otherwise = loop {
                    let (body, end) = parse_list(pieces, None, file)?;
                    branches.push((condition, body));
                    match end {
                        Stop::Eof => bail!("{}: unterminated if", context()),
                        Stop::End => break Vec::new(),
                        Stop::Else(Some(next)) => condition = next,
                        Stop::Else(None) => match parse_list(pieces, None, file)? {
                            (otherwise, Stop::End) => break otherwise,
                            _ => bail!("{}: else without end", context()),
                        },
                    }
                };
                nodes.push(Node::If {
                    branches,
                    otherwise,
                });
            }
            "define" => {
                let Some(defines) = defines.as_deref_mut() else {
                    bail!("{}: define only at the top of a file", context());
                };
                let name: String = serde_json::from_str(rest).with_context(context)?;
                let (body, end) = parse_list(pieces, None, file)?;
                ensure!(
                    matches!(end, Stop::End),
                    "{}: unterminated define",
                    context()
                );
                ensure!(
                    defines.insert(name.clone(), body).is_none(),
                    "{}: {name:?} is defined twice",
                    context()
                );
            }
            "range" | "with" | "template" | "block" | "break" | "continue" => {
                bail!("{}: {keyword} is not supported", context())
            }
            _ => nodes.push(Node::Print(parse_pipeline(&piece).with_context(context)?)),
        }
    }
    Ok((nodes, Stop::Eof))
}

#[derive(Debug, PartialEq)]
enum Token {
    Open,
    Close,
    Bar,
    Word(String),
    Str(String),
}

fn tokens(text: &str) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | '|' => {
                chars.next();
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Bar,
                });
            }
            '"' => {
                let end = action_end_of_string(&text[at..])?;
                out.push(Token::Str(
                    serde_json::from_str(&text[at..at + end]).context("a string literal")?,
                ));
                while chars.peek().is_some_and(|&(i, _)| i < at + end) {
                    chars.next();
                }
            }
            '`' => {
                let close = text[at + 1..]
                    .find('`')
                    .ok_or_else(|| anyhow!("unclosed raw string"))?;
                out.push(Token::Str(text[at + 1..at + 1 + close].to_owned()));
                while chars.peek().is_some_and(|&(i, _)| i <= at + 1 + close) {
                    chars.next();
                }
            }
            c if c == '.' || c == '-' || c == '_' || c.is_alphanumeric() => {
                let mut word = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == '.' || c == '-' || c == '_' || c.is_alphanumeric() {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(word));
            }
            '$' => bail!("variables are not supported"),
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(out)
}

/// The length of the string literal that starts `text` (quotes included).
fn action_end_of_string(text: &str) -> Result<usize> {
    let bytes = text.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    bail!("unclosed string literal")
}

fn parse_pipeline(text: &str) -> Result<Pipeline> {
    let tokens = tokens(text)?;
    let mut at = 0;
    let p = pipeline_at(&tokens, &mut at)?;
    ensure!(at == tokens.len(), "unexpected {:?}", tokens[at]);
    Ok(p)
}

fn pipeline_at(tokens: &[Token], at: &mut usize) -> Result<Pipeline> {
    let mut commands = vec![Command { words: Vec::new() }];
    while let Some(token) = tokens.get(*at) {
        let word = match token {
            Token::Close => break,
            Token::Bar => {
                *at += 1;
                commands.push(Command { words: Vec::new() });
                continue;
            }
            Token::Open => {
                *at += 1;
                let sub = pipeline_at(tokens, at)?;
                ensure!(tokens.get(*at) == Some(&Token::Close), "unclosed (");
                Term::Sub(sub)
            }
            Token::Str(s) => Term::Str(s.clone()),
            Token::Word(w) => word(w)?,
        };
        *at += 1;
        commands.last_mut().unwrap().words.push(word);
    }
    ensure!(
        commands.iter().all(|c| !c.words.is_empty()),
        "an empty command"
    );
    for later in &commands[1..] {
        ensure!(
            matches!(later.words[0], Term::Function(_)),
            "only a function can follow |"
        );
    }
    Ok(commands)
}

fn word(w: &str) -> Result<Term> {
    Ok(if w == "." {
        Term::Dot
    } else if let Some(path) = w.strip_prefix('.') {
        let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
        ensure!(
            keys.iter()
                .all(|k| !k.is_empty() && !k.contains('-') && !k.starts_with(char::is_numeric)),
            "bad field {w:?}"
        );
        Term::Field(keys)
    } else if w == "true" || w == "false" {
        Term::Bool(w == "true")
    } else if w.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Term::Int(w.parse().with_context(|| format!("the number {w:?}"))?)
    } else if w.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        ensure!(w != "nil", "nil is not supported");
        Term::Function(w.to_owned())
    } else {
        bail!("unexpected {w:?}")
    })
}
