//! Runs a replay [`Script`] against a program with the simulator.
//!
//! Steps the runner does not know are handed to an [`Extension`] that
//! claims their first word; the XMPP tests plug their fake agents in that
//! way (`agent NAME receives: …`, `agent NAME says: …`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::glob::{Glob, escape};
use super::script::{ExtStep, RESERVED, Script, Step, StepKind};
use super::session::{Next, Sim, SimConfig};
use super::transcript::{Dir, Transcript};

/// Default bound of `expect`, `stderr-has` and `sent`.
pub const DEFAULT_WITHIN: Duration = Duration::from_secs(2);

/// Exit bound when a script has no `exits-within` step.
pub const DEFAULT_EXIT: Duration = Duration::from_secs(2);

/// What an extension may set up before the child starts.
#[derive(Debug, Default)]
pub struct Setup {
    /// Values for `{{NAME}}` placeholders in the config block (e.g. the
    /// port of a test XMPP server).
    pub placeholders: BTreeMap<String, String>,
    /// Extra environment for the child.
    pub env: Vec<(String, String)>,
}

/// Runs the steps whose first word is [`Extension::keyword`].
pub trait Extension: Send {
    fn keyword(&self) -> &str;

    /// Before the child starts (start servers, fill in placeholders).
    fn prepare<'a>(&'a mut self, _setup: &'a mut Setup) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Run one step; `within` is the script's current wait bound. An error
    /// fails the script at the step's line.
    fn run<'a>(
        &'a mut self,
        step: &'a ExtStep,
        sim: &'a mut Sim,
        within: Duration,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// After the last step (e.g. check that nothing unexpected arrived).
    fn finish<'a>(&'a mut self, _sim: &'a mut Sim) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// A passed script.
#[derive(Debug)]
pub struct Outcome {
    pub elapsed: Duration,
    pub transcript: Transcript,
}

/// A failed script: where, why, and the whole transcript.
#[derive(Debug)]
pub struct Failure {
    pub name: String,
    pub line: usize,
    pub message: String,
    pub transcript: Option<Transcript>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}:{}: {}", self.name, self.line, self.message)?;
        if let Some(t) = &self.transcript {
            writeln!(
                f,
                "--- transcript (-> to the child, <- from it, err its stderr, .. notes) ---"
            )?;
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Runs scripts against one program.
pub struct Runner {
    /// Stands for the word `popivr` at the start of `call:`.
    pub program: PathBuf,
    pub within: Duration,
    pub exit_bound: Duration,
    pub extensions: Vec<Box<dyn Extension>>,
}

impl Runner {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Runner {
            program: program.into(),
            within: DEFAULT_WITHIN,
            exit_bound: DEFAULT_EXIT,
            extensions: Vec::new(),
        }
    }

    pub fn with_extension(mut self, extension: Box<dyn Extension>) -> Self {
        self.extensions.push(extension);
        self
    }

    /// Parse and run one file.
    pub async fn run_file(self, path: &Path) -> Result<Outcome, Failure> {
        let script = Script::from_file(path).map_err(|e| Failure {
            name: e.name,
            line: e.line,
            message: e.message,
            transcript: None,
        })?;
        self.run(&script).await
    }

    pub async fn run(mut self, script: &Script) -> Result<Outcome, Failure> {
        let fail = |line: usize, message: String| Failure {
            name: script.name.clone(),
            line,
            message,
            transcript: None,
        };
        for step in &script.steps {
            if let StepKind::Ext(ext) = &step.kind
                && !self.extensions.iter().any(|e| e.keyword() == ext.keyword)
            {
                let message = if RESERVED.contains(&ext.keyword.as_str()) {
                    format!(
                        "`{}` steps need the XMPP test agents (added by the XMPP issue); none is registered",
                        ext.keyword
                    )
                } else {
                    format!("unknown step `{}`", ext.keyword)
                };
                return Err(fail(step.line, message));
            }
        }

        let mut setup = Setup::default();
        for ext in &mut self.extensions {
            ext.prepare(&mut setup)
                .await
                .map_err(|e| fail(1, format!("{}: {e}", ext.keyword())))?;
        }
        let config_file = match &script.config {
            Some(text) => Some(write_config(&script.name, text, &setup).map_err(|e| fail(1, e))?),
            None => None,
        };
        let mut config = SimConfig::new(substitute_program(&script.call, &self.program));
        config.env.extend(script.env.iter().cloned());
        config.env.extend(setup.env);
        if let Some(file) = &config_file {
            config
                .env
                .push(("POPIVR_CONFIG".into(), file.display().to_string()));
        }
        config.vars.extend(script.vars.iter().cloned());
        config.sounds.extend(script.sounds.iter().cloned());

        let result = match Sim::start(config) {
            Ok(sim) => {
                let mut run = Run {
                    sim,
                    ignores: Vec::new(),
                    within: self.within,
                    exit_checked: false,
                    extensions: &mut self.extensions,
                };
                let result = run.all(script, self.exit_bound).await;
                let transcript = run.sim.transcript();
                match result {
                    Ok(()) => Ok(Outcome {
                        elapsed: run.sim.elapsed(),
                        transcript,
                    }),
                    Err((line, message)) => {
                        // Let the child finish so the transcript shows its last words.
                        run.sim.close();
                        run.sim.wait_end(Duration::from_secs(1)).await;
                        let mut failure = fail(line, message);
                        failure.transcript = Some(run.sim.transcript());
                        Err(failure)
                    }
                }
            }
            Err(e) => Err(fail(1, format!("cannot start `{}`: {e}", script.call))),
        };
        if let Some(file) = config_file {
            let _ = std::fs::remove_file(file);
        }
        result
    }
}

/// `popivr(args)` → `/path/to/program(args)`.
fn substitute_program(call: &str, program: &Path) -> String {
    let end = call.find(['(', ',']).unwrap_or(call.len());
    if call[..end].trim() == "popivr" {
        format!("{}{}", program.display(), &call[end..])
    } else {
        call.to_string()
    }
}

fn write_config(name: &str, text: &str, setup: &Setup) -> Result<PathBuf, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut text = text.to_string();
    for (key, value) in &setup.placeholders {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        return Err(format!("config placeholder {} has no value", &rest[..end]));
    }
    let dir = std::env::temp_dir().join(format!("popivr-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stem = Path::new(name)
        .file_stem()
        .map_or("script".into(), |s| s.to_string_lossy());
    let path = dir.join(format!("{}-{stem}.conf", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// One script run in progress.
struct Run<'a> {
    sim: Sim,
    ignores: Vec<Glob>,
    within: Duration,
    exit_checked: bool,
    extensions: &'a mut [Box<dyn Extension>],
}

impl Run<'_> {
    async fn all(&mut self, script: &Script, exit_bound: Duration) -> Result<(), (usize, String)> {
        for step in &script.steps {
            self.sim.note(format!("line {}: {}", step.line, step.text));
            self.step(step).await.map_err(|m| (step.line, m))?;
        }
        let last = script.steps.last().map_or(1, |s| s.line);
        let end = |m: String| (last, format!("at the end of the script: {m}"));
        if self.sim.wait_end(self.within).await.is_none() {
            return Err(end(
                "the call is still up; end it with `hangup`, `close` or an expected E/H".into(),
            ));
        }
        while let Next::Command(c) = self.sim.next_command(Duration::ZERO).await {
            if !self.ignored(&c.line) {
                return Err(end(format!(
                    "command `{}` at {:.3}s was never expected",
                    escape(&c.line),
                    secs(c.at)
                )));
            }
        }
        for ext in self.extensions.iter_mut() {
            ext.finish(&mut self.sim).await.map_err(end)?;
        }
        // Over a socket nothing exits: the session's end is the whole story.
        if !self.exit_checked && !self.sim.is_socket() {
            self.sim
                .wait_exit(exit_bound)
                .await
                .map_err(|e| end(e.to_string()))?;
        }
        Ok(())
    }

    fn ignored(&self, line: &str) -> bool {
        self.ignores.iter().any(|g| g.matches(line))
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        match &step.kind {
            StepKind::Expect(glob) => self.expect(glob).await,
            StepKind::Ignore(glob) => {
                self.ignores.push(glob.clone());
                Ok(())
            }
            StepKind::Unignore(glob) => {
                let before = self.ignores.len();
                self.ignores.retain(|g| g != glob);
                if self.ignores.len() == before {
                    return Err(format!("`{glob}` was not ignored"));
                }
                Ok(())
            }
            StepKind::ExpectWithin(d) => {
                self.within = *d;
                Ok(())
            }
            StepKind::NoCommand(d) => self.no_command(*d).await,
            StepKind::At(t) => {
                tokio::time::sleep_until((self.sim.started() + *t).into()).await;
                Ok(())
            }
            StepKind::Wait(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            StepKind::Key(k) => {
                self.sim.key(*k);
                Ok(())
            }
            StepKind::Send(line) => {
                self.sim
                    .send_raw(line.replace("<ts>", &unix_time().to_string()));
                Ok(())
            }
            StepKind::Hangup => {
                self.sim.hangup();
                Ok(())
            }
            StepKind::Close => {
                self.sim.close();
                Ok(())
            }
            StepKind::VarIs(name, want) => match self.sim.var(name) {
                Some(v) if v == *want => Ok(()),
                got => Err(format!("{name} is {got:?}, want {want:?}")),
            },
            StepKind::VarUnset(name) => match self.sim.var(name) {
                None => Ok(()),
                Some(v) => Err(format!("{name} is set to {v:?}")),
            },
            StepKind::NoFunctionWrites => match self.sim.function_writes().as_slice() {
                [] => Ok(()),
                writes => Err(format!("dialplan function writes happened: {writes:?}")),
            },
            StepKind::StderrHas(glob) => {
                let found = poll(&self.sim, self.within, |sim| {
                    sim.stderr().iter().any(|l| glob.matches(l))
                })
                .await;
                found
                    .then_some(())
                    .ok_or_else(|| format!("no stderr line matches `{glob}`"))
            }
            StepKind::StderrLacks(glob) => match self.sim.stderr().iter().find(|l| glob.matches(l))
            {
                None => Ok(()),
                Some(l) => Err(format!("stderr line `{}` matches `{glob}`", escape(l))),
            },
            StepKind::Sent(glob) => {
                let found = poll(&self.sim, self.within, |sim| {
                    sim.transcript().lines(Dir::Event).any(|l| glob.matches(l))
                })
                .await;
                found
                    .then_some(())
                    .ok_or_else(|| format!("no event line sent matches `{glob}`"))
            }
            StepKind::ExitsWithin(bound) => {
                if self.sim.wait_end(self.within).await.is_none() {
                    return Err(format!(
                        "the call is still up after {:?}: nothing ended it (E/H, hangup, close)",
                        self.within
                    ));
                }
                self.exit_checked = true;
                self.sim
                    .wait_exit(*bound)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            StepKind::Ext(ext) => {
                let within = self.within;
                let handler = self
                    .extensions
                    .iter_mut()
                    .find(|e| e.keyword() == ext.keyword);
                let handler = handler.expect("checked before the start");
                handler.run(ext, &mut self.sim, within).await
            }
        }
    }

    async fn expect(&mut self, glob: &Glob) -> Result<(), String> {
        let deadline = Instant::now() + self.within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.sim.next_command(left).await {
                Next::Command(c) if glob.matches(&c.line) => return Ok(()),
                Next::Command(c) if self.ignored(&c.line) => {}
                Next::Command(c) => {
                    return Err(format!(
                        "expected `{glob}`, got `{}` at {:.3}s",
                        escape(&c.line),
                        secs(c.at)
                    ));
                }
                Next::TimedOut => {
                    return Err(format!(
                        "no command matching `{glob}` within {:?}",
                        self.within
                    ));
                }
                Next::Ended => {
                    let why = self
                        .sim
                        .end()
                        .map(|e| format!("{:?}", e.reason))
                        .unwrap_or_default();
                    return Err(format!(
                        "the session ended ({why}) before a command matching `{glob}`"
                    ));
                }
            }
        }
    }

    async fn no_command(&mut self, span: Duration) -> Result<(), String> {
        let deadline = Instant::now() + span;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.sim.next_command(left).await {
                Next::Command(c) if self.ignored(&c.line) => {}
                Next::Command(c) => {
                    return Err(format!(
                        "unexpected command `{}` at {:.3}s",
                        escape(&c.line),
                        secs(c.at)
                    ));
                }
                Next::TimedOut | Next::Ended => return Ok(()),
            }
        }
    }
}

/// Check `ok` every frame until it holds or `within` passes.
async fn poll(sim: &Sim, within: Duration, ok: impl Fn(&Sim) -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ok(sim) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_popivr_stands_for_the_program() {
        let p = Path::new("/t/popivr");
        assert_eq!(substitute_program("popivr(keys),n", p), "/t/popivr(keys),n");
        assert_eq!(substitute_program("popivr", p), "/t/popivr");
        assert_eq!(substitute_program("/bin/x(popivr)", p), "/bin/x(popivr)");
    }
}
