//go:build integration

package integration

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Load: pod-creation floods against the real API server and the real webhook binary (issue 13).
// Shared by the integration tests (load_webhook_test.go) and the benchmark (`make bench-webhook`).

// floodStats is what one flood of pod creations gave, seen by the client.
type floodStats struct {
	sent, ok        int
	shed            int            // answered 429 by the webhook (overload or deadline): retried by controllers
	webhookFailures int            // "failed calling webhook": a timeout or an unreachable webhook
	apiThrottled    int            // 429 from the API server's own priority and fairness
	other           map[string]int // anything else, by message prefix
	latencies       []time.Duration
	achievedRate    float64       // sending rate
	doneIn          time.Duration // until the last answer
}

func (f floodStats) errors() int {
	n := f.webhookFailures
	for _, c := range f.other {
		n += c
	}
	return n
}

// floodClient is a client without client-side rate limit: the flood is paced by flood itself.
func floodClient() (kubernetes.Interface, error) {
	cfg := env.cluster.RestConfig()
	cfg.QPS, cfg.Burst = 1e6, 1e6
	cfg.UserAgent = "stasis-load"
	return kubernetes.NewForConfig(cfg)
}

// maxInFlight bounds the creations of a flood waiting for their answers at once.
const maxInFlight = 2000

// flood creates pods made by mk at rate per second for d, open loop: every creation is sent at its
// scheduled time on its own goroutine whatever the answers before it, and its latency counts from
// that time (a client that cannot keep up shows as latency, not as a lower rate). It returns what
// the client saw. At most maxInFlight creations wait for their answers at once: past that a
// creation waits for a free place (still timed from its scheduled time), so that a saturated API
// server shows as latency rather than as this process running out of descriptors (each waiting
// request beyond HTTP/2's streams opens a connection), which failed the evictions measured beside
// the flood.
func flood(ctx context.Context, c kubernetes.Interface, ns string, rate int, d time.Duration, dryRun bool, mk func(i int) *corev1.Pod) floodStats {
	n := int(float64(rate) * d.Seconds())
	type result struct {
		took time.Duration
		err  error
	}
	results := make(chan result, n)
	opts := metav1.CreateOptions{}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	var wg sync.WaitGroup
	inFlight := make(chan struct{}, maxInFlight)
	t0 := time.Now()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		at := t0.Add(time.Duration(float64(i) / float64(rate) * float64(time.Second)))
		if wait := time.Until(at); wait > 0 {
			time.Sleep(wait)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			inFlight <- struct{}{}
			_, err := c.CoreV1().Pods(ns).Create(ctx, mk(i), opts)
			<-inFlight
			results <- result{time.Since(at), err}
		}()
	}
	sentIn := time.Since(t0)
	wg.Wait()
	close(results)
	st := floodStats{other: map[string]int{}, achievedRate: float64(n) / sentIn.Seconds(), doneIn: time.Since(t0)}
	for r := range results {
		st.sent++
		st.latencies = append(st.latencies, r.took)
		st.classify(r.err)
	}
	return st
}

func (f *floodStats) classify(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	switch {
	case err == nil:
		f.ok++
	case strings.Contains(msg, "failed calling webhook"):
		f.webhookFailures++
	case apierrors.IsTooManyRequests(err) && strings.Contains(msg, "stasis"):
		f.shed++
	case apierrors.IsTooManyRequests(err):
		f.apiThrottled++
	default:
		if len(msg) > 80 {
			msg = msg[:80]
		}
		f.other[msg]++
	}
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(math.Ceil(q*float64(len(s))))-1)]
}

// histogram is one Prometheus histogram's cumulative buckets (upper bound → count).
type histogram map[float64]float64

// apiserverAdmission scrapes the API server's own admission latency histogram for one webhook
// (apiserver_admission_webhook_admission_duration_seconds{name=...}), summed over its other labels.
func apiserverAdmission(ctx context.Context, webhook string) (histogram, error) {
	raw, err := env.cluster.Client().CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	return parseHistogram(string(raw), "apiserver_admission_webhook_admission_duration_seconds", map[string]string{"name": webhook}), nil
}

// webhookReviews scrapes the webhook's own review-duration histogram for one path (finer buckets).
func webhookReviews(id string) (histogram, error) {
	text, err := env.webhook.metrics()
	if err != nil {
		return nil, err
	}
	return parseHistogram(text, "stasis_webhook_review_duration_seconds", map[string]string{"webhook": id}), nil
}

// parseHistogram sums the buckets of histogram name over the samples whose labels match want.
func parseHistogram(text, name string, want map[string]string) histogram {
	h := histogram{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := sampleRE.FindStringSubmatch(sc.Text())
		if m == nil || m[1] != name+"_bucket" {
			continue
		}
		labels := map[string]string{}
		for _, l := range labelRE.FindAllStringSubmatch(m[3], -1) {
			labels[l[1]] = l[2]
		}
		match := true
		for k, v := range want {
			match = match && labels[k] == v
		}
		if !match {
			continue
		}
		le := math.Inf(1)
		if labels["le"] != "+Inf" {
			le, _ = strconv.ParseFloat(labels["le"], 64)
		}
		v, _ := strconv.ParseFloat(m[4], 64)
		h[le] += v
	}
	return h
}

// minus is the histogram of the observations made between two scrapes.
func (h histogram) minus(before histogram) histogram {
	out := histogram{}
	for le, v := range h {
		out[le] = v - before[le]
	}
	return out
}

func (h histogram) bounds() []float64 {
	var les []float64
	for le := range h {
		les = append(les, le)
	}
	sort.Float64s(les)
	return les
}

// quantile interpolates linearly inside the bucket, as Prometheus' histogram_quantile does.
func (h histogram) quantile(q float64) float64 {
	les := h.bounds()
	if len(les) == 0 || h[math.Inf(1)] == 0 {
		return 0
	}
	rank := q * h[math.Inf(1)]
	prevLe, prevCount := 0.0, 0.0
	for _, le := range les {
		if h[le] >= rank {
			if math.IsInf(le, 1) {
				return prevLe
			}
			return prevLe + (le-prevLe)*(rank-prevCount)/math.Max(h[le]-prevCount, 1e-9)
		}
		prevLe, prevCount = le, h[le]
	}
	return prevLe
}

// maxBound is the upper bound of the highest non-empty bucket: the histogram's max, at its resolution.
func (h histogram) maxBound() string {
	les := h.bounds()
	prev := 0.0
	for _, le := range les {
		if h[le] == h[math.Inf(1)] {
			if math.IsInf(le, 1) {
				return fmt.Sprintf("> %gs", prev)
			}
			return fmt.Sprintf("≤ %gs", le)
		}
		prev = le
	}
	return "-"
}

func (h histogram) count() int { return int(h[math.Inf(1)]) }

// cpuSeconds is the CPU time so far of the webhook process, the API server and this test process
// (the flood's client and the fake agent): where the machine's 2 cores went during a flood.
func cpuSeconds(ctx context.Context) (webhook, apiserver, client float64, err error) {
	text, err := env.webhook.metrics()
	if err != nil {
		return 0, 0, 0, err
	}
	raw, err := env.cluster.Client().CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return 0, 0, 0, err
	}
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	client = float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
	return sumSeconds(text, "process_cpu_seconds_total"), sumSeconds(string(raw), "process_cpu_seconds_total"), client, nil
}

func sumSeconds(text, name string) float64 {
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if m := sampleRE.FindStringSubmatch(sc.Text()); m != nil && m[1] == name {
			v, _ := strconv.ParseFloat(m[4], 64)
			return v
		}
	}
	return 0
}

// webhookShed is the webhook's count of pod reviews answered 429 without a decision (shed or
// deadline). client-go retries those by itself (Retry-After), so the flood's client sees them only
// as latency.
func webhookShed() (int, error) {
	text, err := env.webhook.metrics()
	if err != nil {
		return 0, err
	}
	return sumSamples(text, "stasis_webhook_reviews_shed_total", map[string]string{"webhook": "pod"}), nil
}

// timedEviction evicts a pod, repeating 429s (checkpoint in progress) as kubectl drain does (but
// without its 5 s pause), and returns the time until the eviction was allowed.
func (s *scenario) timedEviction(name string) (time.Duration, error) {
	t0 := time.Now()
	for {
		err := s.evict(name, false)
		if err == nil {
			return time.Since(t0), nil
		}
		if !apierrors.IsTooManyRequests(err) {
			return time.Since(t0), err
		}
		select {
		case <-s.ctx.Done():
			return time.Since(t0), s.ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// postReview posts an AdmissionReview straight to a webhook process over TLS (cluster CA).
func postReview(ctx context.Context, url string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(string(body)))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return webhookHTTPClient().Do(req)
}

var (
	whClientOnce sync.Once
	whClient     *http.Client
)

func webhookHTTPClient() *http.Client {
	whClientOnce.Do(func() {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		caPEM, _ := env.cluster.CA()
		tr.TLSClientConfig = tlsConfigFor(caPEM)
		whClient = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	})
	return whClient
}

func tlsConfigFor(caPEM []byte) *tls.Config {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
}
