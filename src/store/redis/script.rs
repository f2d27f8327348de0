//! The Lua scripts (the `.lua` files beside this one) and how they are sent.
//!
//! Our own [`Script`] rather than `redis::Script`: its invocation is sent by
//! redis-rs on a connection of its own choosing, while ours is a plain
//! command that the store sends like any other, on the shared connection,
//! pipelined with a `WAIT` when replicas are asked for, with the record's
//! key names written straight into it.

use std::sync::OnceLock;

use redis::Cmd;

use super::keys::Key;

/// A Lua script sent by its SHA-1, and in full when the server does not
/// know it (first use, `SCRIPT FLUSH`, a restarted or new cluster node).
pub(super) struct Script {
    source: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(source: &'static str) -> Self {
        Self { source, sha: OnceLock::new() }
    }

    /// The command that runs the script: `EVALSHA` by its SHA-1, or `EVAL`
    /// with its source.
    pub(super) fn invoke(&self, by_sha: bool, keys: &[Key<'_>], args: &[&[u8]]) -> Cmd {
        let (name, script) = if by_sha {
            ("EVALSHA", self.sha.get_or_init(|| redis::Script::new(self.source).get_hash().to_owned()).as_str())
        } else {
            ("EVAL", self.source)
        };
        // Sized up front: growing the command's buffers cost reallocations.
        let size = name.len()
            + script.len()
            + 1
            + keys.iter().map(Key::len).sum::<usize>()
            + args.iter().map(|arg| arg.len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args.len(), size);
        cmd.arg(name).arg(script).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    }
}

pub(super) static CLAIM: Script = Script::new(include_str!("scripts/claim.lua"));
pub(super) static COMPLETE: Script =
    Script::new(concat!(include_str!("scripts/complete.lua"), include_str!("scripts/wake_waiters.lua")));
pub(super) static RELEASE: Script =
    Script::new(concat!(include_str!("scripts/release.lua"), include_str!("scripts/wake_waiters.lua")));
pub(super) static RENEW: Script = Script::new(include_str!("scripts/renew.lua"));
pub(super) static WAIT: Script = Script::new(include_str!("scripts/wait.lua"));
