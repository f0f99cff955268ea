package webhook

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/rs/zerolog"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// path is one admission path: how its object decodes, what decides it, and its bulkhead.
type path struct {
	id       string
	mutating bool
	decode   func(rv *review) error
	// decide returns the verdict; a mutating path mutates rv.obj in place.
	decide func(w *Webhook, ctx context.Context, rv *review) verdict
	// timeout is the configuration's timeoutSeconds for this path.
	timeout time.Duration
	// slots bounds the reviews in flight on this path (and so the goroutines and memory a flood
	// can take); a review that finds none free is answered at once (shed), never queued.
	slots chan struct{}
}

// reviewHandler serves one admission path.
type reviewHandler struct {
	w    *Webhook
	p    *path
	log  zerolog.Logger
	m    *Metrics
	cfg  *Config
	sync func() bool
}

// answer is a decided review: its verdict and, for an allowed mutation, the patch.
type answer struct {
	v     verdict
	patch []byte
}

func (h *reviewHandler) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	t0 := time.Now()
	rv, err := h.read(rw, r)
	if err != nil {
		code := http.StatusBadRequest
		var re *requestError
		if errors.As(err, &re) {
			code = re.code
		}
		h.log.Warn().Str("path", r.URL.Path).Int("code", code).Err(err).Msg("refused admission request")
		h.m.badRequests.WithLabelValues(h.p.id).Inc()
		http.Error(rw, err.Error(), code)
		return
	}
	a, outcome := h.run(r, rv)
	if !a.v.Allowed && a.v.Code == 0 {
		a.v.Code, a.v.Reason = http.StatusForbidden, metav1.StatusReasonForbidden
	}
	body, err := encodeResponse(rv.AdmissionReview, a.v, a.patch)
	if err != nil {
		http.Error(rw, "encoding the admission response: "+err.Error(), http.StatusInternalServerError)
		return
	}
	rw.Header().Set("Content-Type", "application/json")
	_, _ = rw.Write(body)
	took := time.Since(t0)
	h.m.reviews.WithLabelValues(h.p.id, rv.Namespace, strconv.FormatBool(a.v.Allowed), strconv.Itoa(int(cmp.Or(a.v.Code, 200))), outcome).Observe(took.Seconds())
	h.logReview(rv, a, outcome, took)
}

func (h *reviewHandler) logReview(rv *review, a answer, outcome string, took time.Duration) {
	ev := h.log.Info()
	if !a.v.Allowed {
		ev = h.log.Warn()
	}
	ev.Str("webhook", h.p.id).Str("uid", rv.ID).Str("ns", rv.Namespace).Str("name", rv.Name).
		Bool("dryRun", rv.DryRun).Bool("allowed", a.v.Allowed).Int32("code", a.v.Code).Str("outcome", outcome).
		Str("detail", a.v.Message).Int("patchBytes", len(a.patch)).Dur("took", took).Msg("admission review")
}

// read guards and decodes the request: the review and its object, once each.
func (h *reviewHandler) read(rw http.ResponseWriter, r *http.Request) (*review, error) {
	body, err := readBody(rw, r, h.cfg.MaxBodyBytes)
	if err != nil {
		return nil, err
	}
	ar, err := DecodeReview(body)
	if err != nil {
		return nil, err
	}
	rv := &review{AdmissionReview: ar}
	if err := h.p.decode(rv); err != nil {
		return nil, err
	}
	return rv, nil
}

// Outcomes of a review, as the metrics and the log name them.
const (
	outcomeDecided  = "decided"
	outcomeShed     = "shed"     // no free slot on the path: answered at once
	outcomeDeadline = "deadline" // the decision did not finish in time: answered before the API server gives up
	outcomeNotReady = "not-ready"
	outcomePanic    = "panic"
)

// run decides the review within the path's bulkhead and before its deadline. Past the deadline
// the review is answered 429 (retry) at once; the decision, whose context is cancelled, ends in
// the background and only then frees its slot, so the number of decisions running stays bounded.
func (h *reviewHandler) run(r *http.Request, rv *review) (answer, string) {
	if h.sync != nil && !h.sync() {
		return answer{v: retryLater(time.Second, "stasis: the webhook's caches are not synced yet; retry")}, outcomeNotReady
	}
	select {
	case h.p.slots <- struct{}{}:
	default:
		h.m.shed.WithLabelValues(h.p.id, outcomeShed).Inc()
		return answer{v: retryLater(h.cfg.RetryAfter, "stasis: %d %s reviews in flight, the webhook's limit; retry", cap(h.p.slots), h.p.id)}, outcomeShed
	}
	h.m.inFlight.WithLabelValues(h.p.id).Inc()
	deadline := reviewDeadline(r, h.p.timeout, h.cfg.DeadlineMargin)
	ctx, cancel := context.WithTimeout(r.Context(), deadline)
	defer cancel() // a decision still running past the deadline stops at its next call
	done := make(chan answer, 1)
	panicked := make(chan struct{})
	go func() {
		defer func() { <-h.p.slots; h.m.inFlight.WithLabelValues(h.p.id).Dec() }()
		defer func() {
			if p := recover(); p != nil {
				h.log.Error().Str("webhook", h.p.id).Str("uid", rv.ID).Msg(fmt.Sprintf("panic in review: %v", p))
				close(panicked)
			}
		}()
		done <- h.decide(ctx, rv)
	}()
	select {
	case a := <-done:
		return a, outcomeDecided
	case <-panicked:
		return answer{v: deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: internal error deciding the review")}, outcomePanic
	case <-ctx.Done():
		select {
		case a := <-done: // decided at the last moment
			return a, outcomeDecided
		default:
		}
		h.m.shed.WithLabelValues(h.p.id, outcomeDeadline).Inc()
		return answer{v: retryLater(h.cfg.RetryAfter, "stasis: review not decided within its deadline (%s); retry", deadline)}, outcomeDeadline
	}
}

// decide runs the path's decision and, for an allowed mutation, computes the patch.
func (h *reviewHandler) decide(ctx context.Context, rv *review) answer {
	w := h.w.forReview(rv.DryRun)
	v := h.p.decide(w, ctx, rv)
	if !h.p.mutating || !v.Allowed || v.Unchanged {
		return answer{v: v}
	}
	if v.Patch != nil {
		return answer{v: v, patch: v.Patch}
	}
	patch, err := mutationPatch(rv.NewObjectRaw, rv.obj)
	if err != nil {
		return answer{v: deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: computing the patch: %v", err)}
	}
	return answer{v: v, patch: patch}
}
