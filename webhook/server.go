package webhook

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
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

// CertReloader serves a key pair from files and picks up a new one when the files change
// (cert-manager rotates the Secret; the kubelet swaps the mounted files).
type CertReloader struct {
	certFile, keyFile string
	mu                sync.RWMutex
	cert              *tls.Certificate
	certPEM, keyPEM   []byte
}

// NewCertReloader loads the key pair once; failure to load it at start is an error.
func NewCertReloader(certFile, keyFile string) (*CertReloader, error) {
	r := &CertReloader{certFile: certFile, keyFile: keyFile}
	if _, err := r.Reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// Reload reads the files and swaps the certificate when they changed. A broken pair (e.g. read
// half-way through a rotation) keeps the current certificate.
func (r *CertReloader) Reload() (changed bool, err error) {
	c, err := os.ReadFile(r.certFile)
	if err != nil {
		return false, fmt.Errorf("reading TLS certificate: %w", err)
	}
	k, err := os.ReadFile(r.keyFile)
	if err != nil {
		return false, fmt.Errorf("reading TLS key: %w", err)
	}
	r.mu.RLock()
	same := bytes.Equal(c, r.certPEM) && bytes.Equal(k, r.keyPEM)
	r.mu.RUnlock()
	if same {
		return false, nil
	}
	pair, err := tls.X509KeyPair(c, k)
	if err != nil {
		return false, fmt.Errorf("loading TLS key pair %s, %s: %w", r.certFile, r.keyFile, err)
	}
	r.mu.Lock()
	r.cert, r.certPEM, r.keyPEM = &pair, c, k
	r.mu.Unlock()
	return true, nil
}

// GetCertificate is for tls.Config.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.cert, nil
}

// GetClientCertificate is for tls.Config of a client (the agent client's mTLS identity).
func (r *CertReloader) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.cert, nil
}

// Watch reloads every interval until ctx ends.
func (r *CertReloader) Watch(ctx context.Context, every time.Duration, log zerolog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			changed, err := r.Reload()
			if err != nil {
				log.Warn().Err(err).Msg("TLS certificate not reloaded; keeping the current one")
			} else if changed {
				log.Info().Str("cert", r.certFile).Msg("TLS certificate reloaded")
			}
		}
	}
}

// Serve runs the admission handler on TLS and health/metrics on plain HTTP until ctx ends, then
// shuts both down gracefully (readiness goes false first, so no new reviews are routed here).
// ready reports whether the webhook can decide (informers synced).
func Serve(ctx context.Context, cfg ServerConfig, admission http.Handler, gatherer prometheus.Gatherer, ready func() bool, log zerolog.Logger) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	certs, err := NewCertReloader(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return err
	}
	go certs.Watch(ctx, cfg.CertReload, log)

	var stopping atomic.Bool
	health := http.NewServeMux()
	health.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	health.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if stopping.Load() || !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	health.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))

	tlsSrv := &http.Server{
		Addr:    cfg.Listen,
		Handler: admission,
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: certs.GetCertificate,
		},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		// Above the longest review: the wait budget (< 30 s) plus recording.
		WriteTimeout:   45 * time.Second,
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       stdlog.New(log.With().Str("server", "admission").Logger(), "", 0),
	}
	healthSrv := &http.Server{Addr: cfg.HealthListen, Handler: health, ReadHeaderTimeout: 5 * time.Second}

	tlsLn, healthLn := cfg.tlsListener, cfg.healthListener
	if tlsLn == nil {
		if tlsLn, err = net.Listen("tcp", cfg.Listen); err != nil {
			return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
		}
	}
	if healthLn == nil {
		if healthLn, err = net.Listen("tcp", cfg.HealthListen); err != nil {
			tlsLn.Close()
			return fmt.Errorf("listening on %s: %w", cfg.HealthListen, err)
		}
	}
	log.Info().Str("listen", tlsLn.Addr().String()).Str("health", healthLn.Addr().String()).Msg("stasis webhook serving")

	errc := make(chan error, 2)
	go func() { errc <- tlsSrv.ServeTLS(tlsLn, "", "") }()
	go func() { errc <- healthSrv.Serve(healthLn) }()
	select {
	case err := <-errc:
		_ = tlsSrv.Close()
		_ = healthSrv.Close()
		return err
	case <-ctx.Done():
	}
	stopping.Store(true)
	if cfg.ShutdownDelay > 0 {
		log.Info().Dur("delay", cfg.ShutdownDelay).Msg("stopping: serving on, not ready, until the endpoint is gone")
		select {
		case err := <-errc:
			return err
		case <-time.After(cfg.ShutdownDelay):
		}
	}
	log.Info().Msg("shutting down: finishing reviews in flight")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	err = tlsSrv.Shutdown(sctx)
	_ = healthSrv.Shutdown(sctx)
	return err
}
