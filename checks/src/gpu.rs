//! `gpu` check: NVIDIA GPUs through NVML (nvml-wrapper; the driver library is loaded at run
//! time, so the agent builds and runs without one). Per GPU: temperature, memory used,
//! utilisation, power, volatile uncorrectable ECC errors, retired pages; XID errors seen since
//! the last run; the GPU count against `expected_count`.
//!
//! NVML is reached through the [`GpuSource`] trait so that the threshold logic is tested with a
//! fake source (no GPU exists on the development machines). Without an NVIDIA driver the check
//! is UNKNOWN "no NVIDIA driver found". Remapped rows (Ampere and later) are not exposed by
//! nvml-wrapper 0.13's safe API and are not reported yet.
//!
//! XID events come from one NVML event set kept for the life of the process (shared by all
//! `gpu` checks of the agent: configure one per node); the first run registers it, so XIDs are
//! reported from the second run on.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::threshold::{above, invalid, metric, validate_pair, worst};
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

fn d80() -> f64 {
    80.0
}
fn d90() -> f64 {
    90.0
}
fn default_critical_xids() -> Vec<u64> {
    vec![48, 63, 64, 79, 94, 95]
}

/// A GPU check, as written under `check:` with `type: gpu`. Temperatures in °C, percentages of
/// the GPU's total, power in watts; each value alerts when it is *above* its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuCheck {
    /// Number of GPUs the node must have; fewer (a GPU fell off the bus) is CRITICAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_count: Option<u32>,
    /// GPU core temperature, °C (default 80).
    #[serde(default = "d80")]
    pub temperature_warning: f64,
    /// GPU core temperature, °C (default 90).
    #[serde(default = "d90")]
    pub temperature_critical: f64,
    /// Memory used, percent of total (default: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_warning: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_critical: Option<f64>,
    /// GPU utilisation, percent (default: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_warning: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_critical: Option<f64>,
    /// Power draw, watts (default: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_warning: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_critical: Option<f64>,
    /// Volatile (since driver load) uncorrectable ECC errors above which the GPU is CRITICAL
    /// (default 0: any is CRITICAL).
    #[serde(default)]
    pub max_ecc_uncorrected: u64,
    /// Retired memory pages above which the GPU is WARNING (default: not checked; pages
    /// waiting to be retired are always WARNING: the GPU needs a reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retired_pages: Option<u64>,
    /// XID codes that are CRITICAL (default 48, 63, 64, 79, 94, 95); any other XID is WARNING.
    #[serde(default = "default_critical_xids")]
    pub critical_xids: Vec<u64>,
}

/// What NVML said about one GPU; `None` where the GPU does not support the query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub temperature_c: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization_percent: Option<f64>,
    pub power_watts: Option<f64>,
    pub ecc_uncorrected: Option<u64>,
    pub retired_pages: Option<u64>,
    pub retirement_pending: Option<bool>,
}

/// One read of all GPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    pub driver_version: String,
    pub gpus: Vec<GpuReading>,
    /// XID errors since the previous read: (GPU index, XID).
    pub xids: Vec<(u32, u64)>,
    /// Whether XID events are being watched (false on GPUs or drivers without event support).
    pub xid_watch: bool,
}

/// Where GPU readings come from: NVML on a real node, a fake in tests.
pub trait GpuSource {
    /// Reads every GPU. `Err` is why the GPUs cannot be read at all (no driver).
    fn read(&mut self) -> Result<GpuSnapshot, String>;
}

// ---- NVML ----

static NVML: OnceLock<nvml_wrapper::Nvml> = OnceLock::new();
/// The XID event sets (one per GPU index), kept between runs; `None` until the first
/// successful registration.
#[allow(clippy::type_complexity, reason = "one static, read in one function")]
static XID_EVENTS: Mutex<Option<Vec<(u32, nvml_wrapper::EventSet<'static>)>>> = Mutex::new(None);

/// The process-wide NVML handle; a failed init is retried on the next call.
pub(crate) fn nvml() -> Result<&'static nvml_wrapper::Nvml, String> {
    use nvml_wrapper::error::NvmlError;
    if let Some(n) = NVML.get() {
        return Ok(n);
    }
    match nvml_wrapper::Nvml::init() {
        Ok(n) => Ok(NVML.get_or_init(|| n)),
        Err(e @ (NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound)) => {
            Err(format!("no NVIDIA driver found ({e})"))
        }
        Err(NvmlError::DriverNotLoaded) => {
            Err("no NVIDIA driver found (the kernel driver is not loaded)".into())
        }
        Err(e) => Err(format!("NVML initialisation failed: {e}")),
    }
}

/// The real source: NVML.
pub struct NvmlSource;

impl GpuSource for NvmlSource {
    fn read(&mut self) -> Result<GpuSnapshot, String> {
        use nvml_wrapper::enum_wrappers::device::{
            EccCounter, MemoryError, RetirementCause, TemperatureSensor,
        };
        let nvml = nvml()?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut snap = GpuSnapshot {
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            ..Default::default()
        };
        for index in 0..count {
            let d = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(index, error = %e, "NVML cannot open GPU");
                    continue;
                }
            };
            let mem = d.memory_info().ok();
            let retired = [
                RetirementCause::MultipleSingleBitEccErrors,
                RetirementCause::DoubleBitEccError,
            ]
            .iter()
            .map(|c| d.retired_pages(*c).map(|p| p.len() as u64))
            .collect::<Result<Vec<u64>, _>>()
            .ok()
            .map(|v| v.iter().sum());
            snap.gpus.push(GpuReading {
                index,
                name: d.name().unwrap_or_default(),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                memory_used_bytes: mem.as_ref().map(|m| m.used),
                memory_total_bytes: mem.as_ref().map(|m| m.total),
                utilization_percent: d.utilization_rates().ok().map(|u| f64::from(u.gpu)),
                power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                ecc_uncorrected: d
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok(),
                retired_pages: retired,
                retirement_pending: d.are_pages_pending_retired().ok(),
            });
        }
        let (xids, watching) = drain_xids(nvml, count);
        snap.xids = xids;
        snap.xid_watch = watching;
        Ok(snap)
    }
}

/// Takes the XID events that arrived since the last call; registers one event set per GPU on
/// the first call (a GPU without event support is skipped). Returns the events and whether
/// XIDs are being watched on any GPU.
fn drain_xids(nvml: &'static nvml_wrapper::Nvml, count: u32) -> (Vec<(u32, u64)>, bool) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let Ok(mut guard) = XID_EVENTS.lock() else {
        return (Vec::new(), false);
    };
    let Some(sets) = guard.as_ref() else {
        let sets: Vec<(u32, nvml_wrapper::EventSet<'static>)> = (0..count)
            .filter_map(|index| {
                let d = nvml.device_by_index(index).ok()?;
                let set = nvml.create_event_set().ok()?;
                match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(s) => Some((index, s)),
                    Err(e) => {
                        tracing::info!(index, error = %e.error, "GPU does not report XID events");
                        None
                    }
                }
            })
            .collect();
        let watching = !sets.is_empty();
        if watching {
            *guard = Some(sets);
        }
        return (Vec::new(), watching);
    };
    let mut out = Vec::new();
    for (index, set) in sets {
        // Bounded: at most 1000 events per GPU and run, never waiting.
        for _ in 0..1000 {
            match set.wait(0) {
                Ok(ev) => {
                    if let Some(XidError::Value(x)) = ev.event_data {
                        out.push((*index, x));
                    }
                }
                Err(_) => break,
            }
        }
    }
    (out, true)
}

// ---- the check ----

impl GpuCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        validate_pair(
            "temperature",
            self.temperature_warning,
            self.temperature_critical,
            None,
        )?;
        for (f, w, c, max) in [
            (
                "memory",
                self.memory_warning,
                self.memory_critical,
                Some(100.0),
            ),
            (
                "utilization",
                self.utilization_warning,
                self.utilization_critical,
                Some(100.0),
            ),
            ("power", self.power_warning, self.power_critical, None),
        ] {
            validate_pair(
                f,
                w.unwrap_or(0.0),
                c.unwrap_or(max.unwrap_or(f64::MAX)),
                max,
            )?;
        }
        if self.expected_count == Some(0) {
            return Err(invalid("expected_count", "must be at least 1"));
        }
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let job = tokio::task::spawn_blocking(|| NvmlSource.read());
        let mut o = match tokio::time::timeout(internal_deadline(timeout), job).await {
            Ok(Ok(r)) => self.evaluate(r),
            Ok(Err(e)) => Outcome::new(Status::Unknown, format!("reading GPUs failed: {e}")),
            Err(_) => Outcome::new(Status::Unknown, "NVML did not answer in time"),
        };
        o.duration = start.elapsed();
        tracing::debug!(status = %o.status, message = %o.message, "gpu check finished");
        o
    }

    /// Runs against any source (the tests' fake).
    pub fn run_with(&self, source: &mut dyn GpuSource) -> Outcome {
        self.evaluate(source.read())
    }

    fn evaluate(&self, read: Result<GpuSnapshot, String>) -> Outcome {
        let snap = match read {
            Ok(s) => s,
            Err(e) => return Outcome::new(Status::Unknown, e),
        };
        let mut status = Status::Ok;
        let mut problems: Vec<String> = Vec::new();
        let mut lines: Vec<String> = Vec::new();
        let mut metrics: Vec<Metric> = Vec::new();
        let mut note = |st: Status, text: String, status: &mut Status| {
            *status = worst(*status, st);
            if st != Status::Ok {
                problems.push(format!("{}: {text}", st.as_str().to_uppercase()));
            }
        };

        let n = snap.gpus.len() as u32;
        let mut count = Metric::new("gpu count", f64::from(n), "");
        if let Some(exp) = self.expected_count {
            count.crit = format!("{exp}:");
            if n < exp {
                note(
                    Status::Critical,
                    format!("{n} GPUs found, expected {exp}"),
                    &mut status,
                );
            }
        }
        metrics.push(count);
        if n == 0 && self.expected_count.is_none() {
            note(Status::Critical, "no GPU found".into(), &mut status);
        }

        for g in &snap.gpus {
            let p = format!("gpu{}", g.index);
            let mut parts = vec![format!("GPU{} {}", g.index, g.name)];
            if let Some(t) = g.temperature_c {
                let st = above(
                    t,
                    Some(self.temperature_warning),
                    Some(self.temperature_critical),
                );
                note(
                    st,
                    format!("GPU{} temperature {t:.0}°C", g.index),
                    &mut status,
                );
                metrics.push(metric(
                    format!("{p} temperature"),
                    t,
                    "C",
                    Some(self.temperature_warning),
                    Some(self.temperature_critical),
                ));
                parts.push(format!("{t:.0}°C"));
            }
            if let (Some(used), Some(total)) = (g.memory_used_bytes, g.memory_total_bytes) {
                let pct = if total == 0 {
                    0.0
                } else {
                    used as f64 * 100.0 / total as f64
                };
                let st = above(pct, self.memory_warning, self.memory_critical);
                note(
                    st,
                    format!("GPU{} memory {pct:.1}% used", g.index),
                    &mut status,
                );
                let mut m = Metric::new(format!("{p} memory used"), used as f64, "B");
                m.min = Some(0.0);
                m.max = Some(total as f64);
                metrics.push(m);
                metrics.push(metric(
                    format!("{p} memory used percent"),
                    pct,
                    "%",
                    self.memory_warning,
                    self.memory_critical,
                ));
                parts.push(format!("mem {pct:.0}%"));
            }
            if let Some(u) = g.utilization_percent {
                let st = above(u, self.utilization_warning, self.utilization_critical);
                note(
                    st,
                    format!("GPU{} utilisation {u:.0}%", g.index),
                    &mut status,
                );
                metrics.push(metric(
                    format!("{p} utilization"),
                    u,
                    "%",
                    self.utilization_warning,
                    self.utilization_critical,
                ));
                parts.push(format!("util {u:.0}%"));
            }
            if let Some(w) = g.power_watts {
                let st = above(w, self.power_warning, self.power_critical);
                note(st, format!("GPU{} power {w:.0} W", g.index), &mut status);
                metrics.push(metric(
                    format!("{p} power"),
                    w,
                    "W",
                    self.power_warning,
                    self.power_critical,
                ));
                parts.push(format!("{w:.0} W"));
            }
            if let Some(e) = g.ecc_uncorrected {
                let limit = self.max_ecc_uncorrected as f64;
                let st = above(e as f64, None, Some(limit));
                note(
                    st,
                    format!("GPU{} {e} uncorrectable ECC errors", g.index),
                    &mut status,
                );
                metrics.push(metric(
                    format!("{p} ecc uncorrected"),
                    e as f64,
                    "c",
                    None,
                    Some(limit),
                ));
            }
            if let Some(r) = g.retired_pages {
                let limit = self.max_retired_pages.map(|m| m as f64);
                note(
                    above(r as f64, limit, None),
                    format!("GPU{} {r} retired pages", g.index),
                    &mut status,
                );
                metrics.push(metric(
                    format!("{p} retired pages"),
                    r as f64,
                    "c",
                    limit,
                    None,
                ));
            }
            if g.retirement_pending == Some(true) {
                note(
                    Status::Warning,
                    format!(
                        "GPU{} has pages pending retirement (reset the GPU)",
                        g.index
                    ),
                    &mut status,
                );
            }
            lines.push(parts.join(" "));
        }

        metrics.push(Metric::new("xid errors", snap.xids.len() as f64, "c"));
        for (idx, xid) in &snap.xids {
            let st = if self.critical_xids.contains(xid) {
                Status::Critical
            } else {
                Status::Warning
            };
            note(st, format!("GPU{idx} XID {xid}"), &mut status);
        }
        let mut summary = lines.join("; ");
        if !snap.driver_version.is_empty() {
            summary.push_str(&format!(" (driver {})", snap.driver_version));
        }
        if !snap.xid_watch {
            summary.push_str(", XID events not watched");
        }
        let message = if problems.is_empty() {
            format!("{n} GPUs: {summary}")
        } else {
            problems.join("; ")
        };
        Outcome {
            status,
            message,
            metrics,
            output: summary,
            duration: Duration::ZERO,
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attachments, CheckKind, CheckSpec};

    /// A FAKE GPU source: there is no GPU on the development or CI machines, so the threshold
    /// logic is tested against readings made up here. The real NVML path is tested below only
    /// for "no driver".
    struct FakeGpus(Result<GpuSnapshot, String>);

    impl GpuSource for FakeGpus {
        fn read(&mut self) -> Result<GpuSnapshot, String> {
            self.0.clone()
        }
    }

    fn healthy(index: u32) -> GpuReading {
        GpuReading {
            index,
            name: "NVIDIA A100-SXM4-80GB".into(),
            temperature_c: Some(45.0),
            memory_used_bytes: Some(8 << 30),
            memory_total_bytes: Some(80 << 30),
            utilization_percent: Some(30.0),
            power_watts: Some(120.5),
            ecc_uncorrected: Some(0),
            retired_pages: Some(0),
            retirement_pending: Some(false),
        }
    }

    fn spec(v: serde_json::Value) -> GpuCheck {
        let s: CheckSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        match s.kind {
            CheckKind::Gpu(g) => g,
            other => panic!("{other:?}"),
        }
    }

    fn fake(gpus: Vec<GpuReading>, xids: Vec<(u32, u64)>) -> FakeGpus {
        FakeGpus(Ok(GpuSnapshot {
            driver_version: "550.54.15".into(),
            gpus,
            xids,
            xid_watch: true,
        }))
    }

    #[test]
    fn fake_gpus_thresholds() {
        let c = spec(serde_json::json!({"type": "gpu", "expected_count": 2,
            "memory_warning": 90, "memory_critical": 95, "power_warning": 300}));
        let o = c.run_with(&mut fake(vec![healthy(0), healthy(1)], vec![]));
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(
            o.message.starts_with("2 GPUs: GPU0 NVIDIA A100"),
            "{}",
            o.message
        );
        assert!(o.message.ends_with("(driver 550.54.15)"), "{}", o.message);
        let labels: Vec<&str> = o.metrics.iter().map(|m| m.label.as_str()).collect();
        for l in [
            "gpu count",
            "gpu0 temperature",
            "gpu0 memory used",
            "gpu0 memory used percent",
            "gpu0 utilization",
            "gpu0 power",
            "gpu0 ecc uncorrected",
            "gpu0 retired pages",
            "gpu1 temperature",
            "xid errors",
        ] {
            assert!(labels.contains(&l), "{l} missing: {labels:?}");
        }

        // A GPU fell off the bus.
        let o = c.run_with(&mut fake(vec![healthy(0)], vec![]));
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.contains("1 GPUs found, expected 2"),
            "{}",
            o.message
        );

        // Hot, and drawing too much power.
        let hot = GpuReading {
            temperature_c: Some(85.0),
            power_watts: Some(350.0),
            ..healthy(1)
        };
        let o = c.run_with(&mut fake(vec![healthy(0), hot], vec![]));
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert!(o.message.contains("GPU1 temperature 85°C"), "{}", o.message);
        assert!(o.message.contains("GPU1 power 350 W"), "{}", o.message);

        // Uncorrectable ECC errors, memory nearly full.
        let bad = GpuReading {
            ecc_uncorrected: Some(2),
            memory_used_bytes: Some(79 << 30),
            ..healthy(0)
        };
        let o = c.run_with(&mut fake(vec![bad, healthy(1)], vec![]));
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("2 uncorrectable ECC errors"));
        assert!(o.message.contains("memory 98.8% used"), "{}", o.message);

        // Pending page retirement is WARNING.
        let pending = GpuReading {
            retirement_pending: Some(true),
            ..healthy(0)
        };
        let o = c.run_with(&mut fake(vec![pending, healthy(1)], vec![]));
        assert_eq!(o.status, Status::Warning);
    }

    #[test]
    fn fake_gpus_xids() {
        let c = spec(serde_json::json!({"type": "gpu"}));
        let o = c.run_with(&mut fake(vec![healthy(0)], vec![(0, 31)]));
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert!(o.message.contains("GPU0 XID 31"));
        for xid in [48, 63, 64, 79, 94, 95] {
            let o = c.run_with(&mut fake(vec![healthy(0)], vec![(0, xid)]));
            assert_eq!(o.status, Status::Critical, "XID {xid}: {}", o.message);
        }
        let xm = o_metric(&c.run_with(&mut fake(vec![healthy(0)], vec![(0, 79), (0, 13)])));
        assert_eq!(xm, 2.0);
    }

    fn o_metric(o: &Outcome) -> f64 {
        o.metrics
            .iter()
            .find(|m| m.label == "xid errors")
            .unwrap()
            .value
    }

    #[test]
    fn fake_source_errors_and_missing_values() {
        let c = spec(serde_json::json!({"type": "gpu"}));
        let o = c.run_with(&mut FakeGpus(Err("no NVIDIA driver found (x)".into())));
        assert_eq!(o.status, Status::Unknown);
        // A GPU that supports none of the queries still counts.
        let bare = GpuReading {
            index: 0,
            name: "Tesla T4".into(),
            ..Default::default()
        };
        let o = c.run_with(&mut fake(vec![bare], vec![]));
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        let o = c.run_with(&mut fake(vec![], vec![]));
        assert_eq!(o.status, Status::Critical);
    }

    /// Real NVML: these machines have no NVIDIA driver, so the check must say so (UNKNOWN).
    #[tokio::test]
    async fn real_nvml_without_driver_is_unknown() {
        let s: CheckSpec = serde_json::from_value(serde_json::json!({"type": "gpu"})).unwrap();
        let o = s.run(&Attachments::default()).await;
        if std::path::Path::new("/proc/driver/nvidia/version").exists() {
            // A machine with a driver: anything but "no driver".
            assert!(
                !o.message.contains("no NVIDIA driver found"),
                "{}",
                o.message
            );
        } else {
            assert_eq!(o.status, Status::Unknown, "{}", o.message);
            assert!(
                o.message.contains("no NVIDIA driver found"),
                "{}",
                o.message
            );
        }
    }

    #[test]
    fn validation() {
        for bad in [
            serde_json::json!({"type": "gpu", "temperature_warning": 95}),
            serde_json::json!({"type": "gpu", "memory_warning": 150}),
            serde_json::json!({"type": "gpu", "expected_count": 0}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        let c = spec(serde_json::json!({"type": "gpu"}));
        assert_eq!(c.critical_xids, [48, 63, 64, 79, 94, 95]);
        assert_eq!(c.max_ecc_uncorrected, 0);
    }
}
