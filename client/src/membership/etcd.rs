//! Who is live: the etcd backend, for clusters that outgrow a static list. Each node keeps
//! a key `PREFIX<member id in hex>` = `<control address>` alive with an etcd lease; when the
//! node dies its lease expires and etcd deletes the key. Nodes and clients read the prefix
//! once and then watch it, so everyone sees a member come and go. No consensus of our own:
//! etcd is the source of truth, and a member is live exactly while its key exists.
//!
//! One background thread runs the etcd client on a small single-threaded tokio runtime. If
//! etcd cannot be reached, the last view is kept (and logged); the thread reconnects,
//! re-registers and reads the prefix afresh.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions,
};
use parking_lot::{Condvar, Mutex};

use super::{Liveness, Membership, PeerView};

/// Settings of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the registrations. Default `/mooncake/members/`.
    pub prefix: String,
    /// Lease time to live: a dead node's key disappears this long after its last keep-alive.
    /// Default 3 s; whole seconds, at least 1.
    pub ttl: Duration,
    /// This process's own registration, for a node (`None` for a client that only watches).
    pub register: Option<Registration>,
    /// How long a newly registered member takes to reach its full placement weight. Default
    /// 60 s.
    pub join_ramp: Duration,
}

/// What a node registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// Its member id.
    pub id: u64,
    /// Its control address, as others should dial it.
    pub addr: SocketAddr,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/mooncake/members/".into(),
            ttl: Duration::from_secs(3),
            register: None,
            join_ramp: crate::placement::JOIN_RAMP,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Member id -> (address, when it appeared).
    members: BTreeMap<u64, (SocketAddr, Instant)>,
    /// Whether the prefix has been read at least once.
    synced: bool,
}

/// The etcd membership backend; dropping it revokes this node's registration (if any) and
/// stops watching.
#[derive(Debug)]
pub struct EtcdMembership {
    config: EtcdConfig,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EtcdMembership {
    /// Starts the etcd thread: connect, register (for a node), read the prefix, watch it.
    ///
    /// # Errors
    ///
    /// A config that cannot work (no endpoint, a TTL under 1 s, an empty prefix), or a thread
    /// or runtime that cannot be started. Reaching etcd is retried in the background.
    pub fn start(config: EtcdConfig) -> std::io::Result<Self> {
        let invalid =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
        if config.endpoints.is_empty() {
            return Err(invalid("etcd membership needs at least one endpoint"));
        }
        if config.ttl < Duration::from_secs(1) {
            return Err(invalid("the etcd lease TTL must be at least 1 s"));
        }
        if config.prefix.is_empty() {
            return Err(invalid("the etcd key prefix must not be empty"));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, config) = (Arc::clone(&state), Arc::clone(&stop), config.clone());
            std::thread::Builder::new()
                .name("mooncake-etcd".into())
                .spawn(move || runtime.block_on(run(&config, &state, &stop)))?
        };
        Ok(Self {
            config,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the prefix has been read once (or `limit` passes); whether it has.
    pub fn wait_synced(&self, limit: Duration) -> bool {
        let (state, changed) = &*self.state;
        let deadline = Instant::now() + limit;
        let mut state = state.lock();
        while !state.synced {
            if changed.wait_until(&mut state, deadline).timed_out() {
                return state.synced;
            }
        }
        true
    }
}

impl Membership for EtcdMembership {
    fn view(&self) -> Vec<PeerView> {
        let now = Instant::now();
        self.state
            .0
            .lock()
            .members
            .iter()
            .map(|(&id, &(addr, joined))| PeerView {
                addr,
                id: Some(id),
                liveness: Liveness::Live,
                last_seen: Some(now),
                joined: Some(joined),
            })
            .collect()
    }

    fn join_ramp(&self) -> Duration {
        self.config.join_ramp
    }

    fn period(&self) -> Duration {
        (self.config.ttl / 6).clamp(Duration::from_millis(50), Duration::from_millis(500))
    }
}

impl Drop for EtcdMembership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sessions until stopped; a failed one is logged and retried after a pause.
async fn run(config: &EtcdConfig, state: &(Mutex<State>, Condvar), stop: &AtomicBool) {
    let mut pause = Duration::from_millis(100);
    while !stop.load(Ordering::Acquire) {
        match session(config, state, stop).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, endpoints = ?config.endpoints, "etcd membership: retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One connection to etcd: register, read the prefix, then keep the lease alive and apply
/// watch events until stopped (`Ok`) or something fails (`Err`: start over).
async fn session(
    config: &EtcdConfig,
    state: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
) -> Result<(), etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2));
    let mut client = Client::connect(&config.endpoints, Some(options)).await?;
    let ttl = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
    let mut lease = None;
    if let Some(me) = config.register {
        let id = client.lease_grant(ttl, None).await?.id();
        client
            .put(
                member_key(&config.prefix, me.id),
                me.addr.to_string(),
                Some(PutOptions::new().with_lease(id)),
            )
            .await?;
        let (keeper, responses) = client.lease_keep_alive(id).await?;
        lease = Some((id, keeper, responses));
    }
    let snapshot = client
        .get(
            config.prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let revision = snapshot.header().map_or(0, |h| h.revision());
    {
        let (state, changed) = state;
        let mut state = state.lock();
        let now = Instant::now();
        let previous = std::mem::take(&mut state.members);
        for kv in snapshot.kvs() {
            if let Some((id, addr)) = parse(&config.prefix, kv) {
                // A member seen before keeps its join time.
                let joined = previous
                    .get(&id)
                    .filter(|(a, _)| *a == addr)
                    .map_or(now, |&(_, j)| j);
                state.members.insert(id, (addr, joined));
            }
        }
        state.synced = true;
        changed.notify_all();
    }
    let mut watch = client
        .watch(
            config.prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    // Keep-alives three times per TTL; the stop flag is looked at on the same beat.
    let mut beat = tokio::time::interval((config.ttl / 3).min(Duration::from_millis(200)));
    let mut last_keep_alive = Instant::now();
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if stop.load(Ordering::Acquire) {
                    if let Some((id, _, _)) = lease.take() {
                        // Leave at once rather than when the lease runs out.
                        let _ = client.lease_revoke(id).await;
                    }
                    return Ok(());
                }
                if let Some((_, keeper, responses)) = lease.as_mut()
                    && last_keep_alive.elapsed() >= config.ttl / 3
                {
                    keeper.keep_alive().await?;
                    match responses.message().await? {
                        Some(response) if response.ttl() > 0 => {}
                        // The lease is gone (expired while we were away): register again.
                        _ => return Err(etcd_client::Error::LeaseKeepAliveError(
                            "lease expired".into(),
                        )),
                    }
                    last_keep_alive = Instant::now();
                }
            }
            message = watch.message() => {
                let Some(response) = message? else {
                    return Err(etcd_client::Error::WatchError("watch closed".into()));
                };
                let (state, changed) = state;
                let mut state = state.lock();
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some((id, addr)) = parse(&config.prefix, kv) {
                                let now = Instant::now();
                                let entry = state.members.entry(id).or_insert((addr, now));
                                if entry.0 != addr {
                                    *entry = (addr, now);
                                }
                            }
                        }
                        EventType::Delete => {
                            if let Some(id) = parse_id(&config.prefix, kv.key()) {
                                state.members.remove(&id);
                            }
                        }
                    }
                }
                changed.notify_all();
            }
        }
    }
}

/// The key a member registers under.
pub(crate) fn member_key(prefix: &str, id: u64) -> String {
    format!("{prefix}{id:016x}")
}

/// The member id in a registration key, if it is one.
fn parse_id(prefix: &str, key: &[u8]) -> Option<u64> {
    let hex = key.strip_prefix(prefix.as_bytes())?;
    if hex.len() != 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// A registration (key and value come from etcd: anything malformed is skipped, logged).
fn parse(prefix: &str, kv: &KeyValue) -> Option<(u64, SocketAddr)> {
    let parsed = parse_id(prefix, kv.key()).and_then(|id| {
        let addr = std::str::from_utf8(kv.value()).ok()?.parse().ok()?;
        Some((id, addr))
    });
    if parsed.is_none() {
        tracing::warn!(
            key = %String::from_utf8_lossy(kv.key()),
            "etcd membership: ignoring a malformed registration"
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_refused() {
        let prefix = "/mooncake/members/";
        let key = member_key(prefix, 0xdead_beef_0000_0001);
        assert_eq!(key, "/mooncake/members/deadbeef00000001");
        assert_eq!(
            parse_id(prefix, key.as_bytes()),
            Some(0xdead_beef_0000_0001)
        );
        for bad in [
            "/mooncake/members/xyz",
            "/mooncake/members/deadbeef0000000",
            "/mooncake/members/deadbeef000000011",
            "/other/deadbeef00000001",
            "/mooncake/members/+eadbeef00000001",
        ] {
            assert_eq!(parse_id(prefix, bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn bad_configs_are_refused_before_anything_starts() {
        for config in [
            EtcdConfig {
                endpoints: vec![],
                ..EtcdConfig::default()
            },
            EtcdConfig {
                ttl: Duration::from_millis(500),
                ..EtcdConfig::default()
            },
            EtcdConfig {
                prefix: String::new(),
                ..EtcdConfig::default()
            },
        ] {
            let error = EtcdMembership::start(config).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        }
    }
}
