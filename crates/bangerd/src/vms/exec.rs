//! Commands through the guest agent (`vm exec`): the request checked and translated, output
//! streamed back as exec events, and the session's stdin, signals and window size.

use banger_agent::host::{ExecEvent as AgentEvent, ExecInput, ExecRequest as AgentExec};
use banger_agent::protocol::WindowSize;
use banger_api::vm::{ExecEvent, ExecRequest, ExecResize};
use banger_api::{ApiError, ErrorCode};

use super::{api, Vms};
use crate::hints;

/// The agent request for an API exec request, checked: a command unless a terminal or stdin
/// can feed a login shell, and a window size only with a terminal.
pub(crate) fn agent_request(req: &ExecRequest) -> Result<AgentExec, ApiError> {
    if req.argv.is_empty() && !req.tty && !req.stdin {
        return Err(api(ErrorCode::BadRequest, "no command given")
            .with_hint("banger vm exec NAME -- CMD [ARGS...]"));
    }
    if !req.tty && (req.rows.is_some() || req.cols.is_some()) {
        return Err(api(
            ErrorCode::BadRequest,
            "rows and cols are the size of a terminal; they need tty",
        ));
    }
    if req.user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err(api(
            ErrorCode::BadRequest,
            "the user name contains a NUL byte",
        ));
    }
    let mut r = AgentExec::new(req.argv.clone());
    if let Some(cwd) = &req.cwd {
        r = r.cwd(cwd.clone());
    }
    for (k, v) in &req.env {
        r = r.env(k.clone(), v.clone());
    }
    if req.tty {
        r = r.tty(WindowSize::or_default(req.rows, req.cols));
    }
    if let Some(user) = &req.user {
        r = r.user(user.clone());
    }
    Ok(r)
}

impl Vms {
    /// Runs a command through the agent, sending its output as exec events.
    pub async fn exec(
        &self,
        name: &str,
        req: ExecRequest,
        out: tokio::sync::mpsc::Sender<ExecEvent>,
    ) -> Result<(), ApiError> {
        use base64::Engine;
        let r = agent_request(&req)?;
        let client = self.agent(name).await?;
        let lost = |e: banger_agent::host::AgentError| {
            self.forget_agent(name);
            hints::failed(ErrorCode::VmmFailed, format!("exec in VM {name}"), &e)
        };
        let mut handle = client.exec(r).await.map_err(|e| match e {
            // The connection is fine; the guest's agent is too old for this request.
            banger_agent::host::AgentError::Unsupported { .. } => {
                hints::api_error(ErrorCode::InvalidState, hints::report(&e))
            }
            e => lost(e),
        })?;
        let session = hex::encode(rand::random::<[u8; 12]>());
        // 96 random bits: a session id nobody holds yet.
        let _session = self
            .exec_sessions
            .claim(&session, (name.to_owned(), handle.input.clone()));
        let _ = out.send(ExecEvent::Started { session }).await;
        if !req.stdin {
            handle.input.close().await.map_err(lost)?;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut hung_up = false;
        loop {
            let ev = tokio::select! {
                ev = handle.output.recv() => ev,
                // The caller went away (its stream was dropped): hang the command up, as a
                // closed terminal would (for a terminal session the agent hangs up the whole
                // session), and keep draining until it ends.
                _ = out.closed(), if !hung_up => {
                    hung_up = true;
                    let _ = handle.input.signal(libc::SIGHUP).await;
                    // Nobody will send it more input either.
                    let _ = handle.input.close().await;
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            let event = match ev.map_err(lost)? {
                AgentEvent::Stdout(b) => ExecEvent::Stdout {
                    data: b64.encode(&b),
                },
                AgentEvent::Stderr(b) => ExecEvent::Stderr {
                    data: b64.encode(&b),
                },
                AgentEvent::Exit(status) => {
                    let _ = out
                        .send(ExecEvent::Exit {
                            code: status.shell_code(),
                        })
                        .await;
                    return Ok(());
                }
            };
            // Waits while the client is not reading: the output stays in the guest, whose
            // command blocks on its full pipe. Once the client is gone, output is dropped
            // (the loop above hangs the command up and drains it).
            if !hung_up {
                let _ = out.send(event).await;
            }
        }
        Err(api(
            ErrorCode::VmmFailed,
            format!("lost the command's output in VM {name}"),
        ))
    }

    fn exec_input(&self, name: &str, session: &str) -> Result<ExecInput, ApiError> {
        match self.exec_sessions.get(session) {
            Some((vm, input)) if vm == name => Ok(input),
            _ => Err(api(
                ErrorCode::NotFound,
                format!("no command with session {session} runs in VM {name}"),
            )
            .with_hint("the command may have ended already")),
        }
    }

    /// Streams `body` into a running command's stdin, then closes it. Returns the bytes sent.
    pub async fn exec_stdin(
        &self,
        name: &str,
        session: &str,
        body: axum::body::Body,
    ) -> Result<u64, ApiError> {
        use futures_util::StreamExt;
        let input = self.exec_input(name, session)?;
        let broken = |e: banger_agent::host::AgentError| {
            hints::failed(
                ErrorCode::VmmFailed,
                format!("cannot feed stdin of the command in VM {name}"),
                &e,
            )
        };
        let mut stream = body.into_data_stream();
        let mut sent = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The caller is gone mid-upload: end the command's input rather than leave
                    // it waiting for more.
                    let _ = input.close().await;
                    return Err(api(
                        ErrorCode::BadRequest,
                        format!("stdin upload for VM {name} broke: {e}"),
                    ));
                }
            };
            input.write(&chunk).await.map_err(broken)?;
            sent += chunk.len() as u64;
        }
        input.close().await.map_err(broken)?;
        Ok(sent)
    }

    /// Sends `signal` to a running command's process group.
    pub async fn exec_signal(
        &self,
        name: &str,
        session: &str,
        signal: i32,
    ) -> Result<(), ApiError> {
        if !(1..=64).contains(&signal) {
            return Err(api(
                ErrorCode::BadRequest,
                format!("{signal} is not a signal number"),
            ));
        }
        let input = self.exec_input(name, session)?;
        input.signal(signal).await.map_err(|e| {
            hints::failed(
                ErrorCode::VmmFailed,
                format!("cannot signal the command in VM {name}"),
                &e,
            )
        })
    }

    /// Gives a running terminal command a new window size.
    pub async fn exec_resize(
        &self,
        name: &str,
        session: &str,
        size: ExecResize,
    ) -> Result<(), ApiError> {
        if size.rows == 0 || size.cols == 0 {
            return Err(api(
                ErrorCode::BadRequest,
                format!(
                    "a terminal of {} rows and {} columns cannot be shown",
                    size.rows, size.cols
                ),
            ));
        }
        let input = self.exec_input(name, session)?;
        let size = WindowSize {
            rows: size.rows,
            cols: size.cols,
        };
        input.resize(size).await.map_err(|e| {
            hints::failed(
                ErrorCode::VmmFailed,
                format!("cannot resize the terminal of the command in VM {name}"),
                &e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use banger_agent::protocol::WindowSize;
    use banger_api::vm::ExecRequest;
    use banger_api::ErrorCode;

    use super::agent_request;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            env: vec![("A".into(), "1".into())],
            stdin: false,
            tty: false,
            rows: None,
            cols: None,
            user: None,
        }
    }

    #[test]
    fn a_terminal_request_carries_its_size_user_and_env_to_the_agent() {
        let mut r = req(&[]);
        r.tty = true;
        r.rows = Some(40);
        r.user = Some("app".into());
        let agent = agent_request(&r).unwrap();
        assert_eq!(agent.tty, Some(WindowSize { rows: 40, cols: 80 }));
        assert_eq!(agent.user.as_deref(), Some("app"));
        assert_eq!(agent.env.get("A").map(String::as_str), Some("1"));
        assert!(agent.argv.is_empty());
    }

    #[test]
    fn a_plain_request_has_no_terminal_and_no_user() {
        let agent = agent_request(&req(&["true"])).unwrap();
        assert_eq!((agent.tty, agent.user), (None, None));
    }

    #[test]
    fn nonsense_requests_are_bad_requests() {
        let err = agent_request(&req(&[])).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.message, "no command given");
        let mut sized = req(&["true"]);
        sized.cols = Some(100);
        let err = agent_request(&sized).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("need tty"), "{}", err.message);
    }
}
