//! What the agent and a slot's guard say to each other over their socket: a request to run a
//! command (with the command's stdout and stderr passed along as descriptors), to stop it, and
//! the guard's replies. Each message is a length and its JSON; descriptors ride on the first
//! bytes of the message they belong to (SCM_RIGHTS).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// From the agent to its guard.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Run `sh -c command` (sent with the write ends of its stdout and stderr pipes). Only
    /// when no command of the guard is running.
    Run(Run),
    /// SIGTERM to the command's descendants that left its process group (the agent sends it
    /// to the group itself).
    Term,
    /// SIGKILL to every descendant of the guard, in the group or not.
    Kill,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    pub command: String,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
    /// `Confinement::encode`.
    pub confinement: String,
}

/// From the guard to the agent: `Started` or `NotStarted` for each `Run`, then `Exited`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// `sh` runs, in a process group of its own that `pid` leads.
    Started {
        pid: i32,
    },
    NotStarted {
        why: String,
    },
    /// `sh` has ended (an exit code or the signal that killed it), and so has everything it
    /// left, unless `clean` is false: the guard could not kill every descendant (a fork bomb
    /// outran it) and exits, leaving the rest to the agent's sweep.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        clean: bool,
    },
}

/// The most a message may weigh: a command and its environment, with room to spare.
const MAX_MESSAGE: usize = 64 << 20;

/// `message` as it goes over the socket: its length, then its JSON.
pub fn frame(message: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let length = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut frame = length.to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Sends a `frame`, with `fds` attached (copies: the caller still owns them).
pub fn send(socket: &UnixStream, frame: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(frame)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    // A long message may go in several writes; the descriptors went with its first bytes.
    (&*socket).write_all(&frame[sent..])
}

/// Receives the next message and the descriptors that came with it; `None` when the other end
/// has closed the socket.
pub fn receive<T: DeserializeOwned>(
    socket: &UnixStream,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut length = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (read, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut length)];
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(message) => {
                let mut fds = Vec::new();
                for cmsg in message.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel has just installed these descriptors for us.
                        fds.extend(
                            received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (message.bytes, fds);
            }
        }
    };
    if read == 0 {
        return Ok(None);
    }
    (&*socket).read_exact(&mut length[read..])?;
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a message of {length} bytes")));
    }
    let mut body = vec![0; length];
    (&*socket).read_exact(&mut body)?;
    let message = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    Ok(Some((message, fds)))
}
