package webhook

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/internal/serving"
)

// ServerConfig is the HTTP side: the TLS admission listener and the plain health/metrics listener.
type ServerConfig struct {
	Listen       string
	HealthListen string
	CertFile     string
	KeyFile      string
	// CertReload is how often the certificate files are checked for a new certificate.
	CertReload time.Duration
	// ShutdownGrace bounds the graceful shutdown; the API server's timeout is 30 s.
	ShutdownGrace time.Duration
	// ShutdownDelay is how long a stopping server goes on serving (not ready) before it closes its
	// listeners: the API server sends reviews to a replica until it sees the replica's endpoint
	// removed, and a review sent to a closed listener fails the eviction (500), which makes
	// kubectl drain give up. 0: close at once.
	ShutdownDelay time.Duration

	// Listeners already open (tests); nil means listen on Listen and HealthListen.
	tlsListener, healthListener net.Listener
}

func (c *ServerConfig) defaults() error {
	if c.Listen == "" {
		c.Listen = ":8443"
	}
	if c.HealthListen == "" {
		c.HealthListen = ":8080"
	}
	if c.CertFile == "" || c.KeyFile == "" {
		return errors.New("--tls-cert-file and --tls-key-file are required: the API server calls webhooks over TLS only")
	}
	if c.CertReload == 0 {
		c.CertReload = 10 * time.Second
	}
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = 35 * time.Second
	}
	return nil
}

// Serve runs the admission handler on TLS and health/metrics on plain HTTP until ctx ends, then
// shuts both down gracefully (readiness goes false first, so no new reviews are routed here).
// synced reports whether the webhook can decide (informers synced).
func Serve(ctx context.Context, cfg ServerConfig, admission http.Handler, gatherer prometheus.Gatherer, synced func() bool, log zerolog.Logger) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	certs, err := serving.NewCertSource(cfg.CertFile, cfg.KeyFile, "")
	if err != nil {
		return fmt.Errorf("--tls-cert-file/--tls-key-file: %w", err)
	}
	certs.Every = cfg.CertReload

	var draining atomic.Bool
	health := serving.Health(gatherer,
		serving.Check{Name: "serving", Check: func(context.Context) error {
			if draining.Load() {
				return errors.New("shutting down")
			}
			return nil
		}},
		serving.Check{Name: "informer caches", Check: func(context.Context) error {
			if !synced() {
				return errors.New("not synced yet")
			}
			return nil
		}},
		serving.Check{Name: "serving certificate", Check: certs.Healthy})
	tlsSrv := &http.Server{
		Handler:           admission,
		TLSConfig:         certs.ServerConfig(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		// Above the longest review: the wait budget (< 30 s) plus recording.
		WriteTimeout:   45 * time.Second,
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       stdlog.New(log.With().Str("server", "admission").Logger(), "", 0),
	}
	tlsLn, healthLn, err := cfg.listeners()
	if err != nil {
		return err
	}
	log.Info().Str("listen", tlsLn.Addr().String()).Str("health", healthLn.Addr().String()).Msg("stasis webhook serving")
	return serving.Group{
		Servers: []serving.Server{{Name: "admission", HTTP: tlsSrv, Ln: tlsLn, TLS: true}, {Name: "health", HTTP: health, Ln: healthLn}},
		Grace:   cfg.ShutdownGrace,
		Delay:   cfg.ShutdownDelay,
		Draining: func() {
			draining.Store(true)
			log.Info().Dur("delay", cfg.ShutdownDelay).Msg("stopping: serving on, not ready, until the endpoint is gone; then finishing reviews in flight")
		},
	}.Run(ctx)
}

// listeners opens the admission and health listeners unless a test gave them.
func (cfg ServerConfig) listeners() (tlsLn, healthLn net.Listener, err error) {
	tlsLn, healthLn = cfg.tlsListener, cfg.healthListener
	if tlsLn == nil {
		if tlsLn, err = net.Listen("tcp", cfg.Listen); err != nil {
			return nil, nil, fmt.Errorf("--listen %s: %w", cfg.Listen, err)
		}
	}
	if healthLn == nil {
		if healthLn, err = net.Listen("tcp", cfg.HealthListen); err != nil {
			tlsLn.Close()
			return nil, nil, fmt.Errorf("--health-listen %s: %w", cfg.HealthListen, err)
		}
	}
	return tlsLn, healthLn, nil
}
