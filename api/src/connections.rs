//! What one connection may hold: the limits the patched Rocket enforces (`vendor/rocket`,
//! `ConnectionLimits`) set from the settings and from this process's descriptor limit.
//!
//! - `header_read_timeout`: a connection that does not send a request's head within it, or
//!   waits longer than it for its next request, is closed (slowloris, idle connections).
//! - `max_client_connections`: past it, a new connection gets a 503 `busy` problem with
//!   `Retry-After` and is closed. Kept below the descriptor limit minus what the pool and the
//!   process need, so that connections can never take the descriptors the database needs.

use rocket::figment::Figment;

use crate::ApiError;

/// Descriptors kept for everything but client connections, on top of the pool: the LISTEN
/// connection, TLS files, logs, the pick's delivery put-back connection, and a margin.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The figment with `max_client_connections` lowered below the descriptor limit when needed,
/// and the refusal's problem document.
pub fn limit(figment: Figment) -> Figment {
    let open_files = raise_open_file_limit();
    let pool = figment.extract_inner::<u64>("databases.taskexec.max_connections").unwrap_or(8);
    let wanted = figment.extract_inner::<u64>("max_client_connections").unwrap_or(0);
    let cap = cap(wanted, open_files, pool);
    if cap < wanted {
        log::warn!(
            "max_client_connections lowered from {wanted} to {cap}: this process may open \
             {open_files} files, {} of them kept for the database and the process",
            pool + RESERVED_DESCRIPTORS
        );
    }
    let refusal = ApiError::Busy(format!(
        "this server holds as many connections as it serves at once ({cap}); retry shortly"
    ));
    let refusal = serde_json::to_string(&refusal.problem()).unwrap_or_default();
    figment.merge(("max_client_connections", cap)).merge(("connection_refusal", refusal))
}

/// The cap: `wanted`, at most the descriptors left by the pool and the reserve (at least 1).
fn cap(wanted: u64, open_files: u64, pool: u64) -> u64 {
    wanted.min(open_files.saturating_sub(pool + RESERVED_DESCRIPTORS).max(1))
}

/// Raises this process's limit of open files to its hard limit, and returns it: each
/// connection, parked or not, is a descriptor, and 1,024 (a common default) let idle
/// connections starve `/health`.
fn raise_open_file_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid pointer; they affect only this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let before = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                log::debug!("open files limit raised from {before} to {}", limit.rlim_max);
            } else {
                limit.rlim_cur = before;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_the_database() {
        assert_eq!(cap(16384, 1 << 20, 8), 16384);
        assert_eq!(cap(16384, 1024, 8), 1024 - 8 - RESERVED_DESCRIPTORS);
        assert_eq!(cap(16384, 100, 8), 1);
    }
}
