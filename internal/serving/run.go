package serving

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server is one HTTP server and its listener.
type Server struct {
	Name string
	HTTP *http.Server
	Ln   net.Listener
	// TLS serves with HTTP.TLSConfig.
	TLS bool
}

// Group runs servers together: Run starts all of them and, when ctx ends or one fails, calls
// Draining (readiness goes false so no new requests are routed here), serves on for Delay (clients
// that have not yet seen the endpoint removed are still answered), and shuts all of them down
// gracefully within Grace (default 30 s), finishing the requests in flight.
type Group struct {
	Servers  []Server
	Grace    time.Duration
	Delay    time.Duration
	Draining func()
}

// Run blocks until ctx ends or a server fails; it returns that failure.
func (g Group) Run(ctx context.Context) error {
	errc := make(chan error, len(g.Servers))
	var wg sync.WaitGroup
	for _, s := range g.Servers {
		wg.Go(func() {
			var err error
			if s.TLS {
				err = s.HTTP.ServeTLS(s.Ln, "", "")
			} else {
				err = s.HTTP.Serve(s.Ln)
			}
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("%s server: %w", s.Name, err)
			}
		})
	}
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	if g.Draining != nil {
		g.Draining()
	}
	if runErr == nil && g.Delay > 0 {
		select {
		case runErr = <-errc:
		case <-time.After(g.Delay):
		}
	}
	grace := g.Grace
	if grace == 0 {
		grace = 30 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	for _, s := range g.Servers {
		if err := s.HTTP.Shutdown(sctx); err != nil && runErr == nil {
			runErr = fmt.Errorf("%s server: shutdown: %w", s.Name, err)
		}
	}
	wg.Wait()
	return runErr
}

// Check is one condition of /readyz.
type Check struct {
	Name  string
	Check func(context.Context) error
}

// Ready answers 200 when every check passes, else 503 naming each failing check.
func Ready(checks ...Check) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		var failed []string
		for _, c := range checks {
			if err := c.Check(ctx); err != nil {
				failed = append(failed, c.Name+": "+err.Error())
			}
		}
		if len(failed) > 0 {
			http.Error(w, "not ready:\n"+strings.Join(failed, "\n"), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
}

// Health is the plain-HTTP health server of a component: /healthz (the process serves),
// /readyz (every check passes) and /metrics.
func Health(gatherer prometheus.Gatherer, checks ...Check) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.Handle("/readyz", Ready(checks...))
	mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	return &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10}
}
