package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"time"

	"github.com/rs/zerolog"
	"github.com/slok/kubewebhook/v2/pkg/model"
	kwhwebhook "github.com/slok/kubewebhook/v2/pkg/webhook"
	admissionv1 "k8s.io/api/admission/v1"
	admissionv1beta1 "k8s.io/api/admission/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Why Stasis writes the AdmissionReview response itself: kubewebhook's HTTP handler answers every
// validating denial with status code 400, but a held eviction must reach kubectl as 429
// TooManyRequests (the only denial `kubectl drain` retries). So every path goes through
// reviewHandler: it guards the request (method, content type, size, well-formed review and
// object), runs the kubewebhook webhook (measured, so kubewebhook's metrics stay), and builds the
// response from the webhook's result plus the verdict our validators and mutators leave in the
// context (code, reason, denial).

// verdict is a decision with the code and reason the API server passes on to its client.
type verdict struct {
	Allowed  bool
	Code     int32
	Reason   metav1.StatusReason
	Message  string
	Warnings []string
	// Unchanged: a mutator changed nothing; the answer carries no patch (kubewebhook's diff of
	// the re-marshalled object may hold no-op noise such as an added empty status).
	Unchanged bool
}

func allow(msg string, warnings ...string) verdict {
	return verdict{Allowed: true, Message: msg, Warnings: warnings}
}

func deny(code int32, reason metav1.StatusReason, format string, a ...any) verdict {
	return verdict{Code: code, Reason: reason, Message: fmt.Sprintf(format, a...)}
}

type verdictKey struct{}

// verdictSlot carries the verdict from a validator or mutator out of kubewebhook's Review.
type verdictSlot struct{ v *verdict }

func withVerdictSlot(ctx context.Context) (context.Context, *verdictSlot) {
	s := &verdictSlot{}
	return context.WithValue(ctx, verdictKey{}, s), s
}

func setVerdict(ctx context.Context, v verdict) {
	if s, ok := ctx.Value(verdictKey{}).(*verdictSlot); ok {
		s.v = &v
	}
}

// requestError is a request refused before any decision: an HTTP 4xx with a clear message.
type requestError struct {
	code int
	msg  string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &requestError{code: http.StatusBadRequest, msg: fmt.Sprintf(format, a...)}
}

// DecodeReview parses an AdmissionReview (admission.k8s.io/v1 or v1beta1). Every malformed input
// gives an error naming the problem; it never panics (FuzzDecodeReview).
func DecodeReview(body []byte) (model.AdmissionReview, error) {
	if len(body) == 0 {
		return model.AdmissionReview{}, badRequest("empty body: expected an AdmissionReview")
	}
	var tm metav1.TypeMeta
	if err := json.Unmarshal(body, &tm); err != nil {
		return model.AdmissionReview{}, badRequest("body is not an AdmissionReview JSON object: %v", err)
	}
	if tm.Kind != "AdmissionReview" {
		return model.AdmissionReview{}, badRequest("kind %q is not AdmissionReview", tm.Kind)
	}
	switch tm.APIVersion {
	case admissionv1.SchemeGroupVersion.String():
		var r admissionv1.AdmissionReview
		if err := json.Unmarshal(body, &r); err != nil {
			return model.AdmissionReview{}, badRequest("AdmissionReview %s: %v", tm.APIVersion, err)
		}
		if r.Request == nil {
			return model.AdmissionReview{}, badRequest("AdmissionReview has no request")
		}
		if r.Request.UID == "" {
			return model.AdmissionReview{}, badRequest("AdmissionReview request.uid is empty")
		}
		return model.NewAdmissionReviewV1(&r), nil
	case admissionv1beta1.SchemeGroupVersion.String():
		var r admissionv1beta1.AdmissionReview
		if err := json.Unmarshal(body, &r); err != nil {
			return model.AdmissionReview{}, badRequest("AdmissionReview %s: %v", tm.APIVersion, err)
		}
		if r.Request == nil {
			return model.AdmissionReview{}, badRequest("AdmissionReview has no request")
		}
		if r.Request.UID == "" {
			return model.AdmissionReview{}, badRequest("AdmissionReview request.uid is empty")
		}
		return model.NewAdmissionReviewV1Beta1(&r), nil
	default:
		return model.AdmissionReview{}, badRequest("apiVersion %q is not admission.k8s.io/v1 or admission.k8s.io/v1beta1", tm.APIVersion)
	}
}

// reviewHandler serves one admission path.
type reviewHandler struct {
	id string
	// object checks the request's object before the webhook sees it (nil: no check).
	object  func(ar *model.AdmissionReview) error
	webhook kwhwebhook.Webhook
	maxBody int64
	log     zerolog.Logger
	metrics *Metrics
}

func (h *reviewHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t0 := time.Now()
	ar, err := h.read(w, r)
	if err != nil {
		code := http.StatusBadRequest
		var re *requestError
		if errors.As(err, &re) {
			code = re.code
		}
		h.log.Warn().Str("path", r.URL.Path).Int("code", code).Err(err).Msg("refused admission request")
		h.metrics.badRequests.WithLabelValues(h.id).Inc()
		http.Error(w, err.Error(), code)
		return
	}
	ctx, slot := withVerdictSlot(r.Context())
	resp, err := h.webhook.Review(ctx, ar)
	var v verdict
	var patch []byte
	switch {
	case err != nil:
		// Our validators and mutators do not fail; this is kubewebhook refusing the object.
		v = deny(http.StatusBadRequest, metav1.StatusReasonBadRequest, "%s: %v", h.id, err)
	case slot.v != nil:
		v = *slot.v
		if m, ok := resp.(*model.MutatingAdmissionResponse); ok && v.Allowed && !v.Unchanged {
			patch = m.JSONPatchPatch
			v.Warnings = append(v.Warnings, m.Warnings...)
		}
	default:
		switch m := resp.(type) {
		case *model.MutatingAdmissionResponse:
			v, patch = allow("", m.Warnings...), m.JSONPatchPatch
		case *model.ValidatingAdmissionResponse:
			v = verdict{Allowed: m.Allowed, Message: m.Message, Warnings: m.Warnings}
			if !m.Allowed {
				v.Code, v.Reason = http.StatusForbidden, metav1.StatusReasonForbidden
			}
		}
	}
	if string(patch) == "[]" || string(patch) == "null" {
		patch = nil // nothing changed: answer without a patch
	}
	if !v.Allowed && v.Code == 0 {
		v.Code, v.Reason = http.StatusForbidden, metav1.StatusReasonForbidden
	}
	body, err := encodeResponse(ar, v, patch)
	if err != nil {
		http.Error(w, "encoding the admission response: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
	ev := h.log.Info()
	if !v.Allowed {
		ev = h.log.Warn()
	}
	ev.Str("webhook", h.id).Str("uid", ar.ID).Str("ns", ar.Namespace).Str("name", ar.Name).
		Bool("dryRun", ar.DryRun).Bool("allowed", v.Allowed).Int32("code", v.Code).
		Str("detail", v.Message).Int("patchBytes", len(patch)).Dur("took", time.Since(t0)).Msg("admission review")
}

func (h *reviewHandler) read(w http.ResponseWriter, r *http.Request) (model.AdmissionReview, error) {
	if r.Method != http.MethodPost {
		return model.AdmissionReview{}, &requestError{code: http.StatusMethodNotAllowed, msg: "method " + r.Method + " not allowed: POST an AdmissionReview"}
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return model.AdmissionReview{}, &requestError{code: http.StatusUnsupportedMediaType, msg: fmt.Sprintf("content type %q is not application/json", ct)}
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return model.AdmissionReview{}, &requestError{code: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("admission request larger than %d bytes", h.maxBody)}
		}
		return model.AdmissionReview{}, badRequest("reading the request body: %v", err)
	}
	ar, err := DecodeReview(body)
	if err != nil {
		return ar, err
	}
	if h.object != nil {
		if err := h.object(&ar); err != nil {
			return ar, err
		}
	}
	return ar, nil
}

// objectOf returns a check that the review's object (and old object, when given) decodes into T.
func objectOf[T any](what string, needOld bool) func(ar *model.AdmissionReview) error {
	return func(ar *model.AdmissionReview) error {
		if len(ar.NewObjectRaw) == 0 {
			return badRequest("AdmissionReview request.object is empty: expected a %s", what)
		}
		var obj T
		if err := json.Unmarshal(ar.NewObjectRaw, &obj); err != nil {
			return badRequest("request.object is not a %s: %v", what, err)
		}
		if needOld {
			if len(ar.OldObjectRaw) == 0 {
				return badRequest("AdmissionReview request.oldObject is empty: expected a %s", what)
			}
			var old T
			if err := json.Unmarshal(ar.OldObjectRaw, &old); err != nil {
				return badRequest("request.oldObject is not a %s: %v", what, err)
			}
		}
		return nil
	}
}

func encodeResponse(ar model.AdmissionReview, v verdict, patch []byte) ([]byte, error) {
	var result *metav1.Status
	if !v.Allowed {
		result = &metav1.Status{Status: metav1.StatusFailure, Code: v.Code, Reason: v.Reason, Message: v.Message}
	} else if v.Message != "" {
		result = &metav1.Status{Status: metav1.StatusSuccess, Message: v.Message}
	}
	switch ar.OriginalAdmissionReview.(type) {
	case *admissionv1beta1.AdmissionReview:
		resp := &admissionv1beta1.AdmissionResponse{UID: types.UID(ar.ID), Allowed: v.Allowed, Result: result, Warnings: v.Warnings}
		if len(patch) > 0 {
			pt := admissionv1beta1.PatchTypeJSONPatch
			resp.Patch, resp.PatchType = patch, &pt
		}
		return json.Marshal(admissionv1beta1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: admissionv1beta1.SchemeGroupVersion.String(), Kind: "AdmissionReview"},
			Response: resp,
		})
	default:
		resp := &admissionv1.AdmissionResponse{UID: types.UID(ar.ID), Allowed: v.Allowed, Result: result, Warnings: v.Warnings}
		if len(patch) > 0 {
			pt := admissionv1.PatchTypeJSONPatch
			resp.Patch, resp.PatchType = patch, &pt
		}
		return json.Marshal(admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: admissionv1.SchemeGroupVersion.String(), Kind: "AdmissionReview"},
			Response: resp,
		})
	}
}
