package agent

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the agent's Prometheus metrics.
type Metrics struct {
	Registry       *prometheus.Registry
	DumpDuration   prometheus.Histogram
	DumpBytes      prometheus.Counter
	DumpFailures   prometheus.Counter
	FreezeSeconds  prometheus.Histogram
	Thaws          prometheus.Counter
	RestoreResults *prometheus.CounterVec
	// RestoreSeconds: phase=resumed (the app runs) and phase=complete (all its memory is in; the
	// same moment unless the restore is lazy).
	RestoreSeconds *prometheus.HistogramVec
	LocalRefusals  *prometheus.CounterVec
	// The dump scheduler (schedule.go): dumps allowed at once now, dumps waiting for a slot, and
	// the node's measured checkpoint throughput at the current level.
	DumpSlots      prometheus.Gauge
	DumpsWaiting   prometheus.Gauge
	DumpThroughput prometheus.Gauge
}

// NewMetrics registers the agent's metrics in reg (a new registry when nil).
func NewMetrics(reg *prometheus.Registry) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &Metrics{
		Registry: reg,
		DumpDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "stasis_agent_dump_duration_seconds",
			Help:    "Time to checkpoint one container: CRIU dump, file copies, checksums, fsync and commit.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 12),
		}),
		DumpBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "stasis_agent_dump_bytes_total",
			Help: "Bytes of complete checkpoints written.",
		}),
		FreezeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "stasis_agent_freeze_seconds",
			Help:    "Time an app is paused by CRIU for one container's dump (what a periodic checkpoint costs the app).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
		DumpFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "stasis_agent_dump_failures_total",
			Help: "Container dumps that failed.",
		}),
		Thaws: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "stasis_agent_thaws_total",
			Help: "Frozen apps resumed because their pod stayed or their dump failed.",
		}),
		RestoreResults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stasis_agent_restore_results_total",
			Help: "Restore outcomes reported by launchers (result=restored|cold-start).",
		}, []string{"result"}),
		RestoreSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "stasis_agent_restore_seconds",
			Help:    "Time to restore one container, by phase: resumed (the app runs) and complete (all its memory is present; later than resumed when the restore is lazy).",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 12),
		}, []string{"phase"}),
		LocalRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stasis_agent_local_refusals_total",
			Help: "Requests and connections on the launchers' local socket refused, by reason (not-a-pod, unknown-pod, wrong-container, other-pod, other-container, busy, too-many-connections, no-runtime).",
		}, []string{"reason"}),
		DumpSlots: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "stasis_agent_dump_slots",
			Help: "Dumps the scheduler lets run at once now (between --min- and --max-concurrent-dumps, set by the node's measured throughput).",
		}),
		DumpsWaiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "stasis_agent_dumps_waiting",
			Help: "Checkpoint operations waiting for a dump slot.",
		}),
		DumpThroughput: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "stasis_agent_dump_throughput_bytes_per_second",
			Help: "The node's checkpoint throughput measured at the current number of dumps at once (0: not measured yet).",
		}),
	}
	reg.MustRegister(m.DumpSlots, m.DumpsWaiting, m.DumpThroughput)
	reg.MustRegister(m.DumpDuration, m.DumpBytes, m.DumpFailures, m.FreezeSeconds, m.Thaws, m.RestoreResults, m.RestoreSeconds, m.LocalRefusals)
	return m
}

// schedChanged keeps the scheduler's gauges (schedConfig.Changed).
func (m *Metrics) schedChanged(limit, waiting int, bytesPerSec float64) {
	m.DumpSlots.Set(float64(limit))
	m.DumpsWaiting.Set(float64(waiting))
	m.DumpThroughput.Set(bytesPerSec)
}
