//! Docs that run. Every README of the repository (README.md, deploy/, examples/*/,
//! webhook-certs/, and any README added later) is read block by block: each fenced block in a
//! shell language says either `run` or `norun <reason>` in its info string (```` ```sh run ````),
//! and a block that says neither fails the test, so a new document has to decide. The `run`
//! blocks of each document are run in order, by bash, against a control plane of this test's
//! own and the ground's sish, on a copy of the repository; the first failing block fails with
//! its file, line and output. docs/TESTING.md ("Docs that run") has the markers and the
//! substitutions that make a user's command run here.
//!
//! Beside that: every `picotun ...` command in the docs -- fenced or inline, run or not -- is
//! parsed by picotun's own clap definition (`picotun::cli::Cli`), and every `--flag` the docs
//! mention is checked against the mode its section is about.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{Discovery, Scope, verbs};
use picotun_testground::bins::{bin_dir, repo_root};
use picotun_testground::kube_ground::StartOptions;
use picotun_testground::{ControlPlane, Proc, ServerKind, SishOptions, SshClientKey, TunnelServer, free_port};

/// Fenced blocks in these languages are commands: each must say `run` or `norun <reason>`.
const SHELL_LANGUAGES: &[&str] = &["sh", "bash", "shell", "console", "shell-session", "zsh"];

/// How long one block may take; a command that keeps running belongs in a `run background` block.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `run retry` block is retried until it succeeds.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// What a block's info string says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mark {
    /// `run`, `run background` (started, left running until the document is done; it must still
    /// run then), `run retry` (run again until it succeeds: it waits for a background block),
    /// `run fresh` (an alternative to what the document did so far, as the Helm chart to
    /// kustomize: it starts from the cluster the document found; see `the_docs_run_on_the_ground`).
    Run { background: bool, retry: bool, fresh: bool },
    /// `norun <reason>`.
    NoRun(String),
    /// Neither: fine for YAML or output, an error for a shell block.
    Unmarked,
}

#[derive(Clone, Debug)]
struct Block {
    /// The document, relative to the repository root.
    file: String,
    /// The line of the opening fence (1-based).
    line: usize,
    lang: String,
    mark: Mark,
    /// The lines between the fences, the fence's indentation removed.
    body: Vec<String>,
}

impl Block {
    fn is_shell(&self) -> bool {
        SHELL_LANGUAGES.contains(&self.lang.as_str())
    }

    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// The script bash runs, one line per body line (so bash's $LINENO maps to the document):
    /// a console block keeps its `$ ` commands and their continuation lines, output becomes
    /// empty lines.
    fn script(&self) -> Vec<String> {
        if self.lang != "console" && self.lang != "shell-session" {
            return self.body.clone();
        }
        let mut out = Vec::new();
        let mut continued = false;
        for line in &self.body {
            if let Some(cmd) = line.strip_prefix("$ ") {
                out.push(cmd.to_string());
                continued = cmd.trim_end().ends_with('\\');
            } else if continued {
                out.push(line.clone());
                continued = line.trim_end().ends_with('\\');
            } else {
                out.push(String::new());
            }
        }
        out
    }
}

/// Parses an info string: `(lang, mark)`, or an error for a marker that is neither.
fn parse_info(info: &str) -> Result<(String, Mark), String> {
    let mut words = info.split_whitespace();
    let lang = words.next().unwrap_or("").to_string();
    let rest: Vec<&str> = words.collect();
    let mark = match rest.first().copied() {
        None => Mark::Unmarked,
        Some("run") => {
            let (mut background, mut retry, mut fresh) = (false, false, false);
            for w in &rest[1..] {
                match *w {
                    "background" => background = true,
                    "retry" => retry = true,
                    "fresh" => fresh = true,
                    other => {
                        return Err(format!("`run {other}`: a run block takes `background`, `retry` or `fresh`"));
                    }
                }
            }
            Mark::Run { background, retry, fresh }
        }
        Some("norun") => {
            let reason = rest[1..].join(" ");
            if reason.is_empty() {
                return Err("`norun` needs its reason after it (```sh norun needs a tuns.sh account)".into());
            }
            Mark::NoRun(reason)
        }
        Some(other) => return Err(format!("`{other}` after the language: a block says `run` or `norun <reason>`")),
    };
    Ok((lang, mark))
}

/// Every fenced block of a document (any language).
fn blocks(file: &str, text: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let fence_char = match trimmed.chars().next() {
            Some(c @ ('`' | '~')) => c,
            _ => continue,
        };
        let fence_len = trimmed.chars().take_while(|&c| c == fence_char).count();
        if fence_len < 3 {
            continue;
        }
        let (lang, mark) = parse_info(&trimmed[fence_len..]).map_err(|e| format!("{file}:{}: {e}", i + 1))?;
        let mut body = Vec::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            let t = l.trim_start();
            if t.chars().take_while(|&c| c == fence_char).count() >= fence_len && t.trim_matches(fence_char).is_empty()
            {
                closed = true;
                break;
            }
            let strip = l.len() - t.len();
            body.push(l[strip.min(indent)..].to_string());
        }
        if !closed {
            return Err(format!("{file}:{}: the fence is never closed", i + 1));
        }
        out.push(Block { file: file.to_string(), line: i + 1, lang, mark, body });
    }
    Ok(out)
}

/// The documents: every README.md in the repository (not under target/ or hidden directories),
/// README.md first, then by path.
fn documents() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name.starts_with('.') || name == "target" || name == "node_modules" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else if name == "README.md" {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().to_string());
            }
        }
    }
    let root = repo_root();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort_by_key(|p| (p != "README.md", p.clone()));
    out
}

fn read_doc(file: &str) -> String {
    std::fs::read_to_string(repo_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_shell_block_says_run_or_norun() {
    let docs = documents();
    for expected in ["README.md", "deploy/README.md", "examples/ingress/README.md"] {
        assert!(docs.iter().any(|d| d == expected), "{expected} not among the documents found: {docs:?}");
    }
    let mut problems = Vec::new();
    for file in &docs {
        match blocks(file, &read_doc(file)) {
            Err(e) => problems.push(e),
            Ok(blocks) => problems
                .extend(blocks.iter().filter(|b| b.is_shell() && b.mark == Mark::Unmarked).map(|b| {
                format!(
                    "{}: a ```{} block says neither `run` nor `norun <reason>` (docs/TESTING.md, \"Docs that run\")",
                    b.at(),
                    b.lang
                )
            })),
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Flags: the docs against picotun's clap definition.

/// Splits a command line into words the way sh would for simple cases: quotes, backslash
/// escapes; `|`, `;`, `&&`, `||` end a command; `#` at a word's start ends the line.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, commands: &mut Vec<Vec<String>>| {
        if *in_word {
            commands.last_mut().unwrap().push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            '|' | ';' | '&' => {
                end_word(&mut word, &mut in_word, &mut commands);
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                commands.push(Vec::new());
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut commands),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut commands);
    commands.retain(|c| !c.is_empty());
    commands
}

/// The command lines of a shell block (continuations joined, heredoc bodies left out), each
/// with its line in the document.
fn command_lines(block: &Block) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut heredoc: Option<String> = None;
    for (i, line) in block.script().iter().enumerate() {
        let at = block.line + 1 + i;
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((at, String::new()));
        text.push_str(line.trim_end().trim_end_matches('\\'));
        if line.trim_end().ends_with('\\') {
            text.push(' ');
            pending = Some((start, text));
            continue;
        }
        if let Some(pos) = text.find("<<") {
            let tag = text[pos + 2..].trim_start_matches('-').trim().trim_matches(['\'', '"']);
            heredoc = tag.split_whitespace().next().map(str::to_string);
        }
        if !text.trim().is_empty() {
            out.push((start, text));
        }
    }
    out
}

/// picotun's command, with the global args propagated to every subcommand.
fn picotun_command() -> clap::Command {
    let mut cmd = picotun::cli::Cli::command();
    cmd.build();
    cmd
}

/// Every (sub)command path: `agent`, `ca create`, ...
fn subcommands(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, clap::Command)>) {
    for sub in cmd.get_subcommands() {
        let path = if prefix.is_empty() { sub.get_name().to_string() } else { format!("{prefix} {}", sub.get_name()) };
        out.push((path.clone(), sub.clone()));
        subcommands(sub, &path, out);
    }
}

/// The picotun arguments of a command: `picotun ARGS` or `cargo run [...] -- ARGS`.
fn picotun_args(words: &[String]) -> Option<Vec<String>> {
    match words.first().map(String::as_str) {
        Some("picotun") => Some(words.to_vec()),
        Some("cargo") if words.get(1).is_some_and(|w| w == "run") => {
            let sep = words.iter().position(|w| w == "--")?;
            Some(std::iter::once("picotun".to_string()).chain(words[sep + 1..].iter().cloned()).collect())
        }
        _ => None,
    }
}

/// A `picotun ...` command as the docs write it: None when clap takes it; a bare subcommand
/// name (`picotun explain`) names the command and only has to exist.
fn check_picotun_command(args: &[String]) -> Option<String> {
    let cmd = picotun_command();
    let mut all = Vec::new();
    subcommands(&cmd, "", &mut all);
    if args.len() == 1 || all.iter().any(|(p, _)| *p == args[1..].join(" ")) {
        return None;
    }
    match cmd.try_get_matches_from(args) {
        Ok(_) => None,
        Err(e) => Some(e.render().to_string().lines().next().unwrap_or_default().to_string()),
    }
}

/// Inline code spans of a line that is not in a fenced block: (span, is it in a table row's
/// first cell).
fn inline_spans(line: &str) -> Vec<(String, bool)> {
    let first_cell_end =
        if line.trim_start().starts_with('|') { line.trim_start()[1..].find('|').map(|p| p + 1) } else { None };
    let offset = line.len() - line.trim_start().len();
    let mut out = Vec::new();
    let mut rest = line;
    let mut pos = 0;
    while let Some(start) = rest.find('`') {
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let after = &rest[start + ticks..];
        let fence = "`".repeat(ticks);
        let Some(end) = after.find(&fence) else { break };
        // In a table, `\|` is a pipe GitHub shows as `|`.
        let span = after[..end].trim().replace("\\|", "|");
        let abs = pos + start;
        let in_first = first_cell_end.is_some_and(|e| abs < e + offset);
        out.push((span, in_first));
        let consumed = start + ticks + end + ticks;
        pos += consumed;
        rest = &rest[consumed..];
    }
    out
}

/// The mode (picotun subcommand) each line's section is about: a heading naming
/// `picotun <mode>` sets it for itself and the headings below it.
fn section_modes(text: &str, modes: &[String]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut in_fence = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            in_fence = !in_fence;
        }
        if !in_fence && line.starts_with('#') {
            let level = line.chars().take_while(|&c| c == '#').count();
            if current.as_ref().is_some_and(|(l, _)| level <= *l) {
                current = None;
            }
            if let Some(mode) = modes.iter().find(|m| line.contains(&format!("`picotun {m}`"))) {
                current = Some((level, mode.clone()));
            }
        }
        out.push(current.as_ref().map(|(_, m)| m.clone()));
    }
    out
}

fn is_bool_with_value(arg: &clap::Arg) -> bool {
    let values: Vec<String> = arg.get_possible_values().iter().map(|v| v.get_name().to_string()).collect();
    arg.get_action().takes_values() && values == ["true", "false"]
}

/// The flags of a subcommand (its own and the global ones), by long name.
fn flags_of(cmd: &clap::Command) -> BTreeMap<String, clap::Arg> {
    cmd.get_arguments().filter_map(|a| a.get_long().map(|l| (format!("--{l}"), a.clone()))).collect()
}

/// Commands the docs name beside picotun's: their flags are not picotun's.
const OTHER_TOOLS: &[&str] = &[
    "helm",
    "kubectl",
    "kustomize",
    "docker",
    "podman",
    "git",
    "ssh",
    "ssh-keygen",
    "ssh-keyscan",
    "curl",
    "openssl",
    "oc",
    "kind",
    "make",
];

/// Problems with the flags and picotun commands one document mentions.
fn flag_problems(file: &str, text: &str) -> Vec<String> {
    let cmd = picotun_command();
    let mut all = Vec::new();
    subcommands(&cmd, "", &mut all);
    let modes: Vec<String> = all.iter().filter(|(p, _)| !p.contains(' ')).map(|(p, _)| p.clone()).collect();
    let by_mode: BTreeMap<String, BTreeMap<String, clap::Arg>> =
        all.iter().map(|(p, c)| (p.clone(), flags_of(c))).collect();
    let any_mode: BTreeMap<String, clap::Arg> = by_mode.values().flat_map(|f| f.clone()).collect();
    let section = section_modes(text, &modes);
    let mut problems = Vec::new();
    let check_command = |at: usize, words: &[String], problems: &mut Vec<String>| {
        if let Some(args) = picotun_args(words)
            && let Some(e) = check_picotun_command(&args)
        {
            problems.push(format!("{file}:{at}: `{}`: {e}", args.join(" ")));
        }
    };

    // Fenced shell blocks, run or not.
    let parsed = match blocks(file, text) {
        Ok(b) => b,
        Err(e) => return vec![e],
    };
    let mut fenced = BTreeSet::new();
    for b in &parsed {
        fenced.extend(b.line..=b.line + b.body.len() + 1);
        if !b.is_shell() {
            continue;
        }
        for (at, line) in command_lines(b) {
            for words in shell_commands(&line) {
                check_command(at, &words, &mut problems);
            }
        }
    }

    // Inline code in prose and tables. A span naming another tool's command (`helm install ...`)
    // is that tool's, and so is a `--flag` after it in the same paragraph, list item or table row
    // (until a `picotun ...` span).
    let mut other_tool: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let at = i + 1;
        if fenced.contains(&at) {
            other_tool = None;
            continue;
        }
        let t = line.trim_start();
        let list_item = t.starts_with("- ")
            || t.starts_with("* ")
            || t.split_once(". ").is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if t.is_empty() || t.starts_with('|') || t.starts_with('#') || list_item {
            other_tool = None;
        }
        let flags = section[i].as_ref().and_then(|m| by_mode.get(m)).unwrap_or(&any_mode);
        let where_ = section[i].as_ref().map(|m| format!("`picotun {m}`")).unwrap_or_else(|| "picotun".into());
        for (span, first_cell) in inline_spans(line) {
            let words: Vec<String> = shell_commands(&span).into_iter().flatten().collect();
            if words.first().is_some_and(|w| w == "picotun" || w == "cargo") {
                other_tool = None;
                for c in shell_commands(&span) {
                    check_command(at, &c, &mut problems);
                }
                continue;
            }
            if let Some(tool) = words.first().filter(|w| OTHER_TOOLS.contains(&w.as_str())) {
                other_tool = Some(tool.clone());
                continue;
            }
            let Some(first) = words.first().filter(|w| w.starts_with("--") && w.len() > 2) else { continue };
            if other_tool.is_some() {
                continue;
            }
            let (name, inline_value) = match first.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (first.clone(), None),
            };
            let Some(arg) = flags.get(&name) else {
                problems.push(format!("{file}:{at}: `{span}`: {where_} has no {name}"));
                continue;
            };
            let value = inline_value.or_else(|| words.get(1).cloned());
            if !arg.get_action().takes_values() {
                if value.is_some() {
                    problems.push(format!("{file}:{at}: `{span}`: {name} is a switch and takes no value"));
                }
            } else if is_bool_with_value(arg) {
                match value {
                    None if !first_cell => problems.push(format!(
                        "{file}:{at}: `{span}`: {name} needs its value (`{name}=true`): picotun refuses it bare"
                    )),
                    Some(v) if !["true", "false"].contains(&v.as_str()) => {
                        problems.push(format!("{file}:{at}: `{span}`: {name} takes true or false, not {v}"))
                    }
                    _ => {}
                }
            }
        }
        // A flag table row, `| --a, --b | PICOTUN_A, PICOTUN_B | `a`, `b` | ...`: each flag's
        // environment fallback, and its default where the docs give it in code.
        if let Some(cells) = table_cells(line).filter(|c| c.len() >= 3) {
            let names = |cell: &str, prefix: &str| -> Vec<String> {
                inline_spans(cell).into_iter().map(|(s, _)| s).filter(|s| s.starts_with(prefix)).collect()
            };
            let (row_flags, envs) = (names(&cells[0], "--"), names(&cells[1], "PICOTUN_"));
            let defaults = names(&cells[2], "");
            // Only a cell that is nothing but code spans (`tuns.sh`, `22`); `4 MiB` or `unset` is prose.
            let plain_defaults =
                cells[2].split('`').step_by(2).all(|outside| outside.trim().trim_matches(',').trim().is_empty());
            if !row_flags.is_empty() && row_flags.len() == defaults.len() && plain_defaults {
                for (flag, documented) in row_flags.iter().zip(&defaults) {
                    let Some(arg) = flags.get(flag) else { continue };
                    let actual: Vec<String> =
                        arg.get_default_values().iter().map(|v| v.to_string_lossy().to_string()).collect();
                    if actual.join(",") != *documented {
                        problems.push(format!(
                            "{file}:{at}: {flag}'s default is `{}`, not `{documented}`",
                            actual.join(",")
                        ));
                    }
                }
            }
            if !row_flags.is_empty() && row_flags.len() == envs.len() {
                for (flag, env) in row_flags.iter().zip(&envs) {
                    let Some(arg) = flags.get(flag) else { continue };
                    let actual = arg.get_env().map(|e| e.to_string_lossy().to_string());
                    if actual.as_deref() != Some(env.as_str()) {
                        problems.push(format!(
                            "{file}:{at}: {flag}'s environment variable is {}, not {env}",
                            actual.unwrap_or_else(|| "none".into())
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// The cells of a table row (`| a | b |`), None for any other line.
fn table_cells(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    let inner = t.strip_prefix('|')?.strip_suffix('|').unwrap_or(t);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    let mut in_code = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => cells.last_mut().unwrap().push(chars.next().unwrap()),
            '`' => {
                in_code = !in_code;
                cells.last_mut().unwrap().push(c);
            }
            '|' if !in_code => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    Some(cells)
}

#[test]
fn every_flag_in_the_docs_is_picotuns() {
    let mut problems = Vec::new();
    for file in documents() {
        problems.extend(flag_problems(&file, &read_doc(&file)));
    }
    assert!(problems.is_empty(), "the docs and `picotun <mode> --help` disagree:\n{}", problems.join("\n"));
}

/// `PICOTUN_...` names in `text` (`PICOTUN_<SERVER>_SSH` kept as written).
fn picotun_variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(p) = rest.find("PICOTUN_") {
        let name: String = rest[p..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_<>".contains(*c))
            .collect();
        rest = &rest[p + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn every_picotun_variable_in_the_docs_exists() {
    // picotun's own (each flag's environment fallback), and the test ground's exports
    // (`PICOTUN_{upper}_SSH` in the launcher is `PICOTUN_<SERVER>_SSH` in the docs).
    let mut all = Vec::new();
    subcommands(&picotun_command(), "", &mut all);
    let mut known: BTreeSet<String> = all
        .iter()
        .flat_map(|(_, c)| {
            c.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().to_string()).collect::<Vec<_>>()
        })
        .collect();
    for dir in ["testground/src", "scripts"] {
        let out = Command::new("grep")
            .args(["-rhoE", "PICOTUN_[A-Z0-9_{}a-z]+"])
            .arg(repo_root().join(dir))
            .output()
            .unwrap();
        known.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.replace("{upper}", "<SERVER>")));
    }
    let mut problems = Vec::new();
    for file in documents() {
        for (i, line) in read_doc(&file).lines().enumerate() {
            for name in picotun_variables(line) {
                if !known.contains(&name) {
                    problems.push(format!("{file}:{}: {name} is no flag's environment variable (`picotun <mode> --help`) nor the test ground's", i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Flags of a mode whose section has a flag table (a row starting with `` | `--flag` ``) and
/// that the section does not mention; global flags count when the document mentions them anywhere.
fn undocumented_flags(file: &str, text: &str) -> Vec<String> {
    let cmd = picotun_command();
    let globals: BTreeSet<String> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect();
    let modes: Vec<String> = cmd.get_subcommands().map(|c| c.get_name().to_string()).collect();
    let section = section_modes(text, &modes);
    let lines: Vec<&str> = text.lines().collect();
    let mentioned = |range: &mut dyn Iterator<Item = usize>| -> BTreeSet<String> {
        range
            .flat_map(|i| inline_spans(lines[i]))
            .flat_map(|(s, _)| shell_commands(&s).into_iter().flatten().collect::<Vec<_>>())
            .filter(|w| w.starts_with("--"))
            .map(|w| w.split('=').next().unwrap().to_string())
            .collect()
    };
    let everywhere = mentioned(&mut (0..lines.len()));
    let mut problems = Vec::new();
    for mode in &modes {
        let in_section: Vec<usize> =
            (0..lines.len()).filter(|&i| section[i].as_deref() == Some(mode.as_str())).collect();
        let has_table = in_section.iter().any(|&i| lines[i].trim_start().starts_with("| `--"));
        if !has_table {
            continue;
        }
        let here = mentioned(&mut in_section.iter().copied());
        let sub = cmd.find_subcommand(mode).unwrap();
        for flag in flags_of(sub).keys() {
            let documented = here.contains(flag) || (globals.contains(flag) && everywhere.contains(flag));
            if !documented && !["--help", "--version"].contains(&flag.as_str()) {
                problems
                    .push(format!("{file}: `picotun {mode}` has {flag}, which its section's flag table does not list"));
            }
        }
    }
    problems
}

#[test]
fn every_flag_of_a_mode_with_a_flag_table_is_in_it() {
    let mut problems = Vec::new();
    for file in documents() {
        problems.extend(undocumented_flags(&file, &read_doc(&file)));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_what_they_are_for() {
    // The known case: a boolean flag written as a switch.
    let doc = "## The controller (`picotun controller`)\n\nrun it with `--restart-uninjected`\n\n\
               | `--restart-uninjected` | x |\n\n## Other\n\n`--no-such-flag` and `picotun agent --nope 1`\n";
    let problems = flag_problems("t.md", doc);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("t.md:3:") && problems[0].contains("`--restart-uninjected=true`"));
    assert!(problems[1].starts_with("t.md:9:") && problems[1].contains("no --no-such-flag"), "{}", problems[1]);
    assert!(problems[2].starts_with("t.md:9:") && problems[2].contains("agent --nope"), "{}", problems[2]);
    // A flag table's environment column.
    let doc =
        "## The agent (`picotun agent`)\n\n| `--server`, `--server-port` | `PICOTUN_SERVER`, `PICOTUN_PORT` | x |\n";
    let problems = flag_problems("t.md", doc);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("--server-port's environment variable is PICOTUN_SERVER_PORT, not PICOTUN_PORT"));
    let doc = "## The agent (`picotun agent`)\n\n| `--server`, `--server-port` | `PICOTUN_SERVER`, `PICOTUN_SERVER_PORT` | `tuns.sh`, `2222` | x |\n";
    let problems = flag_problems("t.md", doc);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("--server-port's default is `22`, not `2222`"), "{}", problems[0]);
    // Another tool's flags: a span starting with its name, and a flag after it in the same
    // paragraph or table row; a `picotun ...` span, a new paragraph or row is picotun's again.
    let doc = "Install with `helm install x --set-file a=b` (`--set-file`).\nStill helm: `--set a=b`, \
               then `picotun agent`: `--set`.\n\n`--set-file`\n\n| `helm --set` | `--set` |\n| `--set` | x |\n";
    let problems = flag_problems("t.md", doc);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("t.md:2:") && problems[0].contains("no --set"), "{}", problems[0]);
    assert!(problems[1].starts_with("t.md:4:") && problems[1].contains("no --set-file"), "{}", problems[1]);
    assert!(problems[2].starts_with("t.md:7:") && problems[2].contains("no --set"), "{}", problems[2]);
    // Fenced commands go through clap, continuation lines joined; a heredoc's body is not a command.
    let doc = "```sh norun example\ncat > f <<EOF\npicotun agent --bogus\nEOF\npicotun agent \\\n  --tunnels-file f --server-port x\n```\n";
    let problems = flag_problems("t.md", doc);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("t.md:5:") && problems[0].contains("--server-port"), "{}", problems[0]);
    let names: Vec<String> = picotun_variables("`PICOTUN_<SERVER>_SSH`, PICOTUN_LOG=x").into_iter().collect();
    assert_eq!(names, ["PICOTUN_<SERVER>_SSH", "PICOTUN_LOG"]);
    let doc = "## The agent (`picotun agent`)\n\n| `--server` | x |\n";
    let missing = undocumented_flags("t.md", doc);
    assert!(
        missing.iter().any(|p| p.contains("has --server-port")) && !missing.iter().any(|p| p.contains("has --server,"))
    );
    // Markers.
    assert!(blocks("t.md", "```sh\nls\n```\n").unwrap()[0].mark == Mark::Unmarked);
    assert!(blocks("t.md", "```sh norun\nls\n```\n").unwrap_err().starts_with("t.md:1:"));
    assert!(blocks("t.md", "```sh runn\nls\n```\n").is_err());
    let b =
        &blocks("t.md", "text\n  ```console run retry\n  $ kubectl get \\\n      pods\n  NAME\n  ```\n").unwrap()[0];
    assert_eq!((b.line, &b.mark), (2, &Mark::Run { background: false, retry: true, fresh: false }));
    assert_eq!(b.script(), ["kubectl get \\", "    pods", ""]);
    assert_eq!(
        shell_commands("picotun ca create | kubectl apply -f - # x"),
        [vec!["picotun", "ca", "create"], vec!["kubectl", "apply", "-f", "-"]]
    );
}

// ---------------------------------------------------------------------------------------------
// Running the blocks.

/// What stands in for the user's world on the ground, and how a block's text is changed to
/// reach it (docs/TESTING.md lists these).
struct World {
    kubeconfig: PathBuf,
    sish: TunnelServer,
    /// The key sish accepts, installed in each document's $HOME as ~/.ssh/id_ed25519 and
    /// ~/.ssh/picotun_ed25519.
    key: SshClientKey,
    picotun_dir: PathBuf,
}

/// Text substitutions for one document: a tuns.sh server name -> sish on 127.0.0.1 (its port and
/// host key come from PICOTUN_SERVER_PORT and PICOTUN_KNOWN_HOSTS); YOUR_PICO_USER -> a user
/// name; each loopback port the document names -> a free one, the same throughout the document.
fn substitute(script: &str, ports: &mut BTreeMap<String, String>) -> String {
    let mut text = script.replace("nue.tuns.sh", "127.0.0.1").replace("YOUR_PICO_USER", DOCS_USER);
    for prefix in ["127.0.0.1:", "localhost:"] {
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(p) = rest.find(prefix) {
            let digits: String = rest[p + prefix.len()..].chars().take_while(|c| c.is_ascii_digit()).collect();
            out.push_str(&rest[..p + prefix.len()]);
            if !digits.is_empty() {
                let port = ports.entry(digits.clone()).or_insert_with(|| free_port().to_string());
                out.push_str(port);
            }
            rest = &rest[p + prefix.len() + digits.len()..];
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// The pico.sh user name of the docs' `YOUR_PICO_USER` (no block opens a tunnel as it).
const DOCS_USER: &str = "docs";

/// A document's run: its directory (a copy of the repository as the working directory, a $HOME
/// of its own) and the blocks started in the background.
struct DocRun<'a> {
    world: &'a World,
    dir: tempfile::TempDir,
    ports: BTreeMap<String, String>,
    background: Vec<(Block, Proc)>,
}

impl<'a> DocRun<'a> {
    fn new(world: &'a World) -> DocRun<'a> {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("repo");
        std::fs::create_dir(&work).unwrap();
        let root = repo_root();
        for e in std::fs::read_dir(&root).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            let ok = Command::new("cp").arg("-r").arg(e.path()).arg(work.join(&name)).status().unwrap().success();
            assert!(ok, "copying {name} of the repository");
        }
        // What a generated certs/ directory in the checkout holds must not change what the docs do.
        for certs in ["deploy/without-cert-manager/certs", "certs"] {
            let _ = std::fs::remove_dir_all(work.join(certs));
        }
        let ssh = dir.path().join("home/.ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        for name in ["id_ed25519", "picotun_ed25519"] {
            std::fs::copy(&world.key.private_key, ssh.join(name)).unwrap();
            std::fs::write(ssh.join(format!("{name}.pub")), format!("{}\n", world.key.public_line)).unwrap();
        }
        DocRun { world, dir, ports: BTreeMap::new(), background: Vec::new() }
    }

    fn command(&mut self, block: &Block) -> (Command, String) {
        let lines = block.script();
        let script = substitute(&lines.join("\n"), &mut self.ports);
        // Line 1 of the script is the body's first line: bash's $LINENO names the document's line.
        let first = block.line + 1;
        let full = format!(
            "trap 'echo \"[docs] {file}:$(( LINENO + {off} )): exit $?\" >&2' ERR\n{script}\n",
            file = block.file,
            off = first - 2
        );
        let path = std::env::var("PATH").unwrap_or_default();
        let mut cmd = Command::new("bash");
        cmd.args(["-Eeuo", "pipefail", "-c", &full])
            .current_dir(self.dir.path().join("repo"))
            .env("HOME", self.dir.path().join("home"))
            .env("KUBECONFIG", &self.world.kubeconfig)
            .env("PATH", format!("{}:{}:{path}", bin_dir().display(), self.world.picotun_dir.display()))
            .env("PICOTUN_SERVER_PORT", self.world.sish.ssh_port().to_string())
            .env("PICOTUN_KNOWN_HOSTS", self.world.sish.known_hosts())
            .env_remove("PICOTUN_LOG");
        // helm keeps its cache and config under HOME, not the developer's.
        for var in [
            "HELM_CACHE_HOME",
            "HELM_CONFIG_HOME",
            "HELM_DATA_HOME",
            "XDG_CACHE_HOME",
            "XDG_CONFIG_HOME",
            "XDG_DATA_HOME",
        ] {
            cmd.env_remove(var);
        }
        (cmd, script)
    }

    /// Runs one block; an error names its file and line and shows its output.
    fn run(&mut self, block: &Block) -> Result<(), String> {
        self.check_background()?;
        let Mark::Run { background, retry, .. } = block.mark else { return Ok(()) };
        let log = self.dir.path().join(format!("block-{}.log", block.line));
        if background {
            let (cmd, _) = self.command(block);
            let proc = Proc::spawn(&format!("docs-{}", block.at()), cmd, &log).map_err(|e| e.to_string())?;
            self.background.push((block.clone(), proc));
            return Ok(());
        }
        let deadline = Instant::now() + if retry { RETRY_FOR } else { Duration::ZERO };
        loop {
            let _ = std::fs::remove_file(&log);
            let (cmd, script) = self.command(block);
            let mut proc = Proc::spawn(&format!("docs-{}", block.at()), cmd, &log).map_err(|e| e.to_string())?;
            let status = proc.wait_exit(BLOCK_TIMEOUT);
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            proc.stop(Duration::from_millis(200));
            let failure = match status {
                Some(s) if s.success() => return Ok(()),
                Some(s) => format!("{}: the block failed ({s})", block.at()),
                None => format!(
                    "{}: the block did not finish in {BLOCK_TIMEOUT:?} (a command that keeps running goes in a \
                     `run background` block)",
                    block.at()
                ),
            };
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
                self.check_background()?;
                continue;
            }
            let retried = if retry { format!(" (retried for {RETRY_FOR:?})") } else { String::new() };
            return Err(format!("{failure}{retried}\n--- the block, as run:\n{script}\n--- its output:\n{output}"));
        }
    }

    /// A background block must keep running until the document is done.
    fn check_background(&mut self) -> Result<(), String> {
        for (block, proc) in &mut self.background {
            if !proc.is_running() {
                return Err(format!(
                    "{}: the background block exited; its output:\n{}",
                    block.at(),
                    std::fs::read_to_string(proc.log_path()).unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), String> {
        let result = self.check_background();
        for (_, proc) in &mut self.background {
            proc.stop(Duration::from_secs(2));
        }
        result
    }
}

/// An object: group, version, kind, namespace ("" for a cluster-scoped one), name.
type ObjectKey = (String, String, String, String, String);

/// The names of every cluster-scoped object and namespace, and of the objects in namespaces
/// other than kube-* (`default` holds a Helm release's record), to remove what a document made
/// before the next one starts.
async fn cluster_objects(client: &kube::Client, discovery: &Discovery) -> BTreeSet<ObjectKey> {
    let mut out = BTreeSet::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !caps.supports_operation(verbs::LIST) || !caps.supports_operation(verbs::DELETE) || ar.kind == "Event" {
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let Ok(list) = api.list_metadata(&ListParams::default()).await else { continue };
            for o in list.items {
                let ns =
                    if caps.scope == Scope::Cluster { String::new() } else { o.metadata.namespace.unwrap_or_default() };
                if ns.starts_with("kube-") {
                    continue;
                }
                let name = o.metadata.name.unwrap_or_default();
                out.insert((ar.group.clone(), ar.version.clone(), ar.kind.clone(), ns, name));
            }
        }
    }
    out
}

async fn remove_new_objects(client: &kube::Client, discovery: &Discovery, before: &BTreeSet<ObjectKey>) {
    // Namespaces first (their Services' cluster-scoped IPAddresses go with them), then the rest.
    let new = |now: &BTreeSet<ObjectKey>| -> Vec<ObjectKey> { now.difference(before).cloned().collect() };
    let api: Api<Namespace> = Api::all(client.clone());
    let namespaces: Vec<String> = new(&cluster_objects(client, discovery).await)
        .into_iter()
        .filter(|(_, _, kind, ns, _)| kind == "Namespace" && ns.is_empty())
        .map(|(_, _, _, _, name)| name)
        .collect();
    for ns in &namespaces {
        let _ = api.delete(ns, &DeleteParams::background()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for ns in &namespaces {
        while api.get_opt(ns).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "namespace {ns}, made by a document, still there after 90 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (group, version, kind, ns, name) in new(&cluster_objects(client, discovery).await) {
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &kind);
        let Some((ar, _)) = discovery.resolve_gvk(&gvk) else { continue };
        let api: Api<DynamicObject> = if ns.is_empty() {
            Api::all_with(client.clone(), &ar)
        } else {
            Api::namespaced_with(client.clone(), &ns, &ar)
        };
        let _ = api.delete(&name, &DeleteParams::background()).await;
    }
}

/// Back to the cluster the document found: what it made removed, its `my-app` there again.
async fn fresh_cluster(client: &kube::Client, discovery: &Discovery, before: &BTreeSet<ObjectKey>, text: &str) {
    remove_new_objects(client, discovery, before).await;
    if text.contains(USER_NAMESPACE) {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": USER_NAMESPACE}})).unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    }
}

/// The line of the heading that ends the section `line` is in (the next heading of the same or
/// a higher level), or None at the end of the document.
fn section_end(text: &str, line: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut in_fence = false;
    let mut level = None;
    let mut headings = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            in_fence = !in_fence;
        }
        if !in_fence && l.starts_with('#') {
            headings.push((i + 1, l.chars().take_while(|&c| c == '#').count()));
        }
    }
    for &(at, l) in &headings {
        if at < line {
            level = Some(l);
        } else if level.is_none_or(|level| l <= level) {
            return Some(at);
        }
    }
    None
}

/// The namespace the docs take as the user's own (`kubectl label namespace my-app ...`).
const USER_NAMESPACE: &str = "my-app";

#[tokio::test]
#[ignore = "needs the test ground (scripts/build-testground)"]
async fn the_docs_run_on_the_ground() {
    // A control plane of its own: the docs install deploy/ under its real names (cluster roles,
    // webhook configuration, admission policies, classes) and delete it again.
    let started = Instant::now();
    let ground = ControlPlane::start(StartOptions::default()).await.unwrap();
    let client = ground.client().await.unwrap();
    // The docs make objects of the types the ground serves (no CRDs): one discovery for all.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = SshClientKey::generate(keys.path(), "user", "ed25519").unwrap();
    let sish = TunnelServer::start(ServerKind::Sish(SishOptions::default()), &[&key]).await.unwrap();
    let picotun = PathBuf::from(env!("CARGO_BIN_EXE_picotun"));
    let world = World {
        kubeconfig: ground.kubeconfig().to_path_buf(),
        sish,
        key,
        picotun_dir: picotun.parent().unwrap().into(),
    };

    let mut summary = vec![format!("[docs] the ground and sish up in {:.1}s", started.elapsed().as_secs_f64())];
    let mut failures = Vec::new();
    // PICOTUN_DOCS=PART: only the documents whose path contains PART (while writing one).
    let only = std::env::var("PICOTUN_DOCS").unwrap_or_default();
    let docs: Vec<String> = documents().into_iter().filter(|d| d.contains(&only)).collect();
    if !only.is_empty() {
        summary.push(format!("[docs] PICOTUN_DOCS={only}: {} of the documents", docs.len()));
    }
    for (n, file) in docs.iter().enumerate() {
        let text = read_doc(file);
        let blocks = blocks(file, &text).unwrap();
        let shell: Vec<&Block> = blocks.iter().filter(|b| b.is_shell()).collect();
        let unmarked: Vec<String> = shell.iter().filter(|b| b.mark == Mark::Unmarked).map(|b| b.at()).collect();
        if !unmarked.is_empty() {
            failures.push(format!("{file}: blocks that say neither run nor norun: {}", unmarked.join(", ")));
        }
        let to_run: Vec<&Block> = shell.iter().copied().filter(|b| matches!(b.mark, Mark::Run { .. })).collect();
        let norun = shell.iter().filter(|b| matches!(b.mark, Mark::NoRun(_))).count();
        if to_run.is_empty() {
            summary.push(format!("[docs] {file}: no blocks to run, {norun} not runnable"));
            continue;
        }
        let before = cluster_objects(&client, &discovery).await;
        if text.contains(USER_NAMESPACE) {
            let ns: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": USER_NAMESPACE}})).unwrap();
            Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        }

        let started = Instant::now();
        let mut run = DocRun::new(&world);
        let (mut ran, mut again) = (0, 0);
        // A `run fresh` block and the run blocks after it in its section are an alternative (the
        // Helm chart instead of kustomize): each fresh block starts from the cluster the document
        // found; when the section ends, the cluster is cleaned again and the blocks of the main
        // path so far run again, so what follows finds what they made.
        let mut main_path: Vec<&Block> = Vec::new();
        let mut alternative_until: Option<Option<usize>> = None;
        let mut failed = None;
        for block in &to_run {
            if let Some(end) = alternative_until
                && end.is_some_and(|end| block.line > end)
            {
                alternative_until = None;
                fresh_cluster(&client, &discovery, &before, &text).await;
                again += main_path.len();
                if let Some(e) = main_path.iter().find_map(|b| run.run(b).err()) {
                    failed =
                        Some(format!("{e}\n(run again after the alternative that ends at {file}:{})", end.unwrap()));
                    break;
                }
            }
            let Mark::Run { background, fresh, .. } = block.mark else { continue };
            if fresh {
                fresh_cluster(&client, &discovery, &before, &text).await;
                alternative_until = Some(section_end(&text, block.line));
            }
            match run.run(block) {
                Ok(()) => ran += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if alternative_until.is_none() && !background {
                main_path.push(block);
            }
        }
        let end = run.finish();
        if let Some(e) = failed.or(end.err()) {
            failures.push(e);
        }
        let took = started.elapsed();
        if n + 1 < docs.len() {
            remove_new_objects(&client, &discovery, &before).await;
        }
        let again = if again > 0 { format!(" ({again} again after an alternative)") } else { String::new() };
        summary.push(format!(
            "[docs] {file}: {ran} of {} blocks ran{again}, {norun} not runnable ({:.1}s; cleaned up in {:.1}s)",
            to_run.len(),
            took.as_secs_f64(),
            (started.elapsed() - took).as_secs_f64()
        ));
    }
    // Straight to the terminal, past the test harness's capture: CI's log shows the counts.
    let _ = writeln!(std::io::stderr(), "{}", summary.join("\n"));
    drop(world);
    ground.stop();
    assert!(failures.is_empty(), "{}\n\n{}", summary.join("\n"), failures.join("\n\n"));
}
