//! The extension point: filters a program built on the `fanout` library registers under a
//! name, which routes then use with `plugins: [{ name: NAME, config: {...} }]`. A filter
//! is any [`RequestFilter`] — the trait the built-in `access`, `cors`, `auth` and
//! `rewrite` implement — made by the constructor registered with it from the route's
//! `config` value. The constructor is the filter's own configuration check: `-t`, the
//! start and every reload call it, and what it refuses is reported like any other
//! configuration error (`routes[2].plugins[0]: ...`), so a bad `config` never runs.
//!
//! ```ignore
//! fanout::filters::plugins::register("tenant", |config| {
//!     Ok(Box::new(Tenant::from_config(config)?))
//! });
//! std::process::exit(fanout::app::main());
//! ```
//!
//! `examples/custom_filter.rs` is a complete gateway with one such filter.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::RequestFilter;
use crate::config::{Config, ConfigError, PluginConfig};

/// Makes a filter from a route's `config` value, or says why it cannot (one line).
pub type Constructor =
    dyn Fn(&serde_yaml::Value) -> Result<Box<dyn RequestFilter>, String> + Send + Sync;

/// The filters registered so far, by name.
static REGISTERED: RwLock<BTreeMap<String, Arc<Constructor>>> = RwLock::new(BTreeMap::new());

/// Registers `constructor` under `name` (replacing one registered before under it). Call
/// it before [`crate::app::main`].
pub fn register(
    name: &str,
    constructor: impl Fn(&serde_yaml::Value) -> Result<Box<dyn RequestFilter>, String>
        + Send
        + Sync
        + 'static,
) {
    REGISTERED
        .write()
        .insert(name.to_string(), Arc::new(constructor));
}

/// The names registered, for messages.
fn known() -> String {
    let names: Vec<String> = REGISTERED.read().keys().cloned().collect();
    match names.is_empty() {
        true => "this binary registers none".into(),
        false => format!("this binary registers {}", names.join(", ")),
    }
}

/// The filter `plugin` names, made from its `config`.
pub(crate) fn build(plugin: &PluginConfig) -> Result<Box<dyn RequestFilter>, String> {
    let constructor = REGISTERED.read().get(&plugin.name).cloned();
    match constructor {
        Some(make) => make(&plugin.config),
        None => Err(format!(
            "no filter is registered as {:?} ({})",
            plugin.name,
            known()
        )),
    }
}

/// Every route's plugins built once and dropped: a problem each, at its place
/// (`routes[2].plugins[0]`), reported like the file's other errors.
pub fn check(config: &Config) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    for (r, route) in config.routes.iter().enumerate() {
        for (i, plugin) in route.plugins.iter().enumerate() {
            if let Err(why) = build(plugin) {
                problems.push(ConfigError::new(format!("routes[{r}].plugins[{i}]"), why));
            }
        }
    }
    problems
}
