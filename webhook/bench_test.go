package webhook

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	"k8s.io/client-go/tools/record"
)

// BenchmarkPodReview is one pod-creation review through the handler (no TLS, no network): the
// webhook's own CPU per review (issue 13).
func BenchmarkPodReview(b *testing.B) {
	// Events dropped: the test recorder's buffer would fill up.
	e := newEnv(b, Config{}, nil, func(_ *Config, d *Deps) { d.Events = &record.FakeRecorder{} })
	body := fixture(b, "pod-create-plain-nocommand.json")
	h, _ := e.wh.Handler()
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodPost, PathMutatePod, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			b.Fatal(rec.Body.String())
		}
	}
}
