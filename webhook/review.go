package webhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"time"

	"github.com/slok/kubewebhook/v2/pkg/model"
	"gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	admissionv1beta1 "k8s.io/api/admission/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Why Stasis writes the AdmissionReview response itself: a held eviction must reach kubectl as
// 429 TooManyRequests (the only denial `kubectl drain` retries), and an overloaded pod path must
// answer 429 with a Retry-After before the API server's timeout. So every path goes through
// reviewHandler (handler.go): it guards the request (method, content type, size), decodes the
// review and its object once, runs the path's decision under the review's deadline and within the
// path's bulkhead, and writes the verdict the decision returned.

// verdict is a decision with the code and reason the API server passes on to its client.
type verdict struct {
	Allowed  bool
	Code     int32
	Reason   metav1.StatusReason
	Message  string
	Warnings []string
	// Unchanged: a mutator changed nothing; the answer carries no patch.
	Unchanged bool
	// Patch, when a mutator built it itself (podPatch), is the answer's JSON patch.
	Patch []byte
	// RetryAfter (seconds) goes into status.details.retryAfterSeconds of a 429, which the API
	// server turns into the Retry-After header its client (client-go, controllers) honours.
	RetryAfter int32
}

func allow(msg string, warnings ...string) verdict {
	return verdict{Allowed: true, Message: msg, Warnings: warnings}
}

func deny(code int32, reason metav1.StatusReason, format string, a ...any) verdict {
	return verdict{Code: code, Reason: reason, Message: fmt.Sprintf(format, a...)}
}

// retryLater is the answer of a review that cannot be decided now (overload, deadline, caches not
// synced): 429, which controllers and kubectl retry, never a timeout the API server turns into a
// failure of the webhook.
func retryLater(after time.Duration, format string, a ...any) verdict {
	v := deny(http.StatusTooManyRequests, metav1.StatusReasonTooManyRequests, format, a...)
	v.RetryAfter = int32(max(1, after.Round(time.Second)/time.Second))
	return v
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

// DecodeReview parses an AdmissionReview (admission.k8s.io/v1 or v1beta1: their JSON is the same
// shape, so one decoding serves both). Every malformed input gives an error naming the problem;
// it never panics (FuzzDecodeReview).
func DecodeReview(body []byte) (model.AdmissionReview, error) {
	if len(body) == 0 {
		return model.AdmissionReview{}, badRequest("empty body: expected an AdmissionReview")
	}
	var r admissionv1.AdmissionReview
	err := json.Unmarshal(body, &r)
	var syntax *json.SyntaxError
	if err != nil && (r.Kind == "" || errors.As(err, &syntax)) {
		return model.AdmissionReview{}, badRequest("body is not an AdmissionReview JSON object: %v", err)
	}
	if r.Kind != "AdmissionReview" {
		return model.AdmissionReview{}, badRequest("kind %q is not AdmissionReview", r.Kind)
	}
	version := model.AdmissionReviewVersionV1
	switch r.APIVersion {
	case admissionv1.SchemeGroupVersion.String():
	case admissionv1beta1.SchemeGroupVersion.String():
		version = model.AdmissionReviewVersionV1beta1
	default:
		return model.AdmissionReview{}, badRequest("apiVersion %q is not admission.k8s.io/v1 or admission.k8s.io/v1beta1", r.APIVersion)
	}
	if err != nil {
		return model.AdmissionReview{}, badRequest("AdmissionReview %s: %v", r.APIVersion, err)
	}
	if r.Request == nil {
		return model.AdmissionReview{}, badRequest("AdmissionReview has no request")
	}
	if r.Request.UID == "" {
		return model.AdmissionReview{}, badRequest("AdmissionReview request.uid is empty")
	}
	ar := model.NewAdmissionReviewV1(&r)
	ar.Version = version
	return ar, nil
}

// review is one decoded request: the AdmissionReview and its object (and old object), each
// decoded once, into the path's type.
type review struct {
	model.AdmissionReview
	obj, old any
}

// decodeObject returns a decoder of the review's object (and old object, when needed) into T.
func decodeObject[T any](what string, needOld bool) func(rv *review) error {
	return func(rv *review) error {
		if len(rv.NewObjectRaw) == 0 {
			return badRequest("AdmissionReview request.object is empty: expected a %s", what)
		}
		obj := new(T)
		if err := json.Unmarshal(rv.NewObjectRaw, obj); err != nil {
			return badRequest("request.object is not a %s: %v", what, err)
		}
		rv.obj = obj
		if needOld {
			if len(rv.OldObjectRaw) == 0 {
				return badRequest("AdmissionReview request.oldObject is empty: expected a %s", what)
			}
			old := new(T)
			if err := json.Unmarshal(rv.OldObjectRaw, old); err != nil {
				return badRequest("request.oldObject is not a %s: %v", what, err)
			}
			rv.old = old
		}
		return nil
	}
}

// mutationPatch is the JSON patch from the request's object to the mutated one.
func mutationPatch(raw []byte, mutated any) ([]byte, error) {
	after, err := json.Marshal(mutated)
	if err != nil {
		return nil, err
	}
	ops, err := jsonpatch.CreatePatch(raw, after)
	if err != nil || len(ops) == 0 {
		return nil, err
	}
	return json.Marshal(ops)
}

func encodeResponse(ar model.AdmissionReview, v verdict, patch []byte) ([]byte, error) {
	var result *metav1.Status
	if !v.Allowed {
		result = &metav1.Status{Status: metav1.StatusFailure, Code: v.Code, Reason: v.Reason, Message: v.Message}
		if v.RetryAfter > 0 {
			result.Details = &metav1.StatusDetails{RetryAfterSeconds: v.RetryAfter}
		}
	} else if v.Message != "" {
		result = &metav1.Status{Status: metav1.StatusSuccess, Message: v.Message}
	}
	// v1 and v1beta1 responses have the same JSON shape; only apiVersion differs.
	apiVersion := admissionv1.SchemeGroupVersion.String()
	if ar.Version == model.AdmissionReviewVersionV1beta1 {
		apiVersion = admissionv1beta1.SchemeGroupVersion.String()
	}
	resp := &admissionv1.AdmissionResponse{UID: types.UID(ar.ID), Allowed: v.Allowed, Result: result, Warnings: v.Warnings}
	if len(patch) > 0 {
		pt := admissionv1.PatchTypeJSONPatch
		resp.Patch, resp.PatchType = patch, &pt
	}
	return json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: apiVersion, Kind: "AdmissionReview"},
		Response: resp,
	})
}

// readBody guards the HTTP request and reads its body.
func readBody(w http.ResponseWriter, r *http.Request, maxBody int64) ([]byte, error) {
	if r.Method != http.MethodPost {
		return nil, &requestError{code: http.StatusMethodNotAllowed, msg: "method " + r.Method + " not allowed: POST an AdmissionReview"}
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return nil, &requestError{code: http.StatusUnsupportedMediaType, msg: fmt.Sprintf("content type %q is not application/json", ct)}
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &requestError{code: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("admission request larger than %d bytes", maxBody)}
		}
		return nil, badRequest("reading the request body: %v", err)
	}
	return body, nil
}

// reviewDeadline is how long a review may take: the API server's own timeout for this call (it
// sends ?timeout=, the configuration's timeoutSeconds) or, without one, the configured timeout of
// the path; minus a margin for the answer's way back. Never below a tenth of the timeout.
func reviewDeadline(r *http.Request, configured, margin time.Duration) time.Duration {
	timeout := configured
	if q := r.URL.Query().Get("timeout"); q != "" {
		if d, err := time.ParseDuration(q); err == nil && d > 0 && d < timeout {
			timeout = d
		}
	}
	return max(timeout-margin, timeout/10)
}
