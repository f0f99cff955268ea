package webhook

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the webhook's.
type Metrics struct {
	checkpointWait *prometheus.HistogramVec
	tooMany        *prometheus.CounterVec
	failures       *prometheus.CounterVec
	wired          *prometheus.CounterVec
	badRequests    *prometheus.CounterVec
	reviews        *prometheus.HistogramVec
	shed           *prometheus.CounterVec
	inFlight       *prometheus.GaugeVec
}

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		checkpointWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "stasis", Subsystem: "webhook", Name: "checkpoint_wait_seconds",
			Help:    "Time an admission request waited for checkpoints, by webhook and outcome (done, in-progress, failed).",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30},
		}, []string{"webhook", "outcome"}),
		tooMany: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "stasis", Subsystem: "webhook", Name: "too_many_requests_total",
			Help: "Requests answered 429 TooManyRequests because a checkpoint was still running.",
		}, []string{"webhook"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "stasis", Subsystem: "webhook", Name: "checkpoint_failures_total",
			Help: "Checkpoints that failed, by webhook and the failure policy applied (fail-closed denies, fail-open allows).",
		}, []string{"webhook", "policy"}),
		wired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "stasis", Subsystem: "webhook", Name: "pods_wired_total",
			Help: "Pods wired at creation, by whether a checkpoint is restored (restore=true).",
		}, []string{"restore"}),
		badRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "stasis", Subsystem: "webhook", Name: "bad_requests_total",
			Help: "Admission requests refused with 4xx before review (malformed, oversized, wrong method).",
		}, []string{"webhook"}),
	}
	m.reviews = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "stasis", Subsystem: "webhook", Name: "review_duration_seconds",
		Help:    "Admission reviews answered, by webhook, namespace, allowed, status code and outcome (decided, shed, deadline, not-ready).",
		Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 15, 30},
	}, []string{"webhook", "namespace", "allowed", "code", "outcome"})
	m.shed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "stasis", Subsystem: "webhook", Name: "reviews_shed_total",
		Help: "Reviews answered 429 without a decision: shed (no free slot on the path) or deadline (not decided in time).",
	}, []string{"webhook", "reason"})
	m.inFlight = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "stasis", Subsystem: "webhook", Name: "reviews_in_flight",
		Help: "Decisions running, by webhook (bounded per path by --max-pod-reviews and --max-eviction-reviews).",
	}, []string{"webhook"})
	reg.MustRegister(m.checkpointWait, m.tooMany, m.failures, m.wired, m.badRequests, m.reviews, m.shed, m.inFlight)
	return m
}
