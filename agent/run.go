package agent

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/wiring"
)

// Run is `stasis agent`.
func Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	listen := fs.String("listen", fmt.Sprintf(":%d", agentapi.DefaultPort), "address of the mTLS agent API")
	certFile := fs.String("tls-cert-file", "", "serving certificate (must carry the name "+agentapi.ServerName+"); reloaded on change")
	keyFile := fs.String("tls-key-file", "", "serving key; reloaded on change")
	caFile := fs.String("client-ca-file", "", "CA that signs client certificates; only "+agentapi.WebhookIdentity+" may start dumps")
	node := fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (downward API spec.nodeName)")
	cri := fs.String("cri-endpoint", "unix:///run/containerd/containerd.sock", "CRI socket of the container runtime")
	criuPath := fs.String("criu-path", "/usr/local/lib/stasis/criu/criu", "the CRIU bundle of the agent image (its wrapper `criu`): the only CRIU the agent runs")
	maxDumps := fs.Int("max-concurrent-dumps", 2, "dumps running at once on this node")
	freeze := fs.Duration("freeze-timeout", 5*time.Minute, "thaw a dumped app whose pod is not deleted within this time")
	dumpTimeout := fs.Duration("dump-timeout", 15*time.Minute, "abandon one container's dump after this time")
	restoreTimeout := fs.Duration("restore-timeout", 5*time.Minute, "start a container afresh when its restore takes longer")
	keep := fs.Int("keep-checkpoints", 2, "complete checkpoints kept per container (newest first)")
	health := fs.String("health-listen", ":8081", "plain HTTP address for /healthz, /readyz and /metrics")
	socketDir := fs.String("socket-dir", wiring.HostAgentDir, "directory of the launchers' local socket "+wiring.AgentSocketName)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig for recording Events (default: in-cluster when a token is mounted, else no Events)")
	level := fs.String("log-level", "info", "zerolog level")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	lvl, err := zerolog.ParseLevel(*level)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := zerolog.New(os.Stderr).Level(lvl).With().Timestamp().Str("component", "stasis-agent").Logger()
	if *node == "" {
		return errors.New("--node-name is required (set NODE_NAME from the downward API)")
	}

	// Version gate: refuse to run with a CRIU that cannot dump on this kernel.
	bundle, v, err := criurun.CheckVersion(*criuPath)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	log.Info().Str("criu", criurun.FormatVersion(v)).Str("path", *criuPath).Msg("CRIU version gate passed")

	tlsCfg, err := ServerTLSConfig(*certFile, *keyFile, *caFile)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	runtime, err := DialCRI(*cri)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	defer runtime.Close()
	events, err := NewKubeEvents(*kubeconfig, *node, log)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if events == nil {
		log.Info().Msg("no Kubernetes client: Events are logged only")
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := NewMetrics(reg)
	a, err := New(ctx, Config{
		NodeName: *node, Criu: bundle, CriuVersion: v, MaxConcurrentDumps: *maxDumps,
		FreezeTimeout: *freeze, DumpTimeout: *dumpTimeout, RestoreTimeout: *restoreTimeout, KeepCheckpoints: *keep,
		Finder: runtime, Events: events, Metrics: metrics, Log: log,
	})
	if err != nil {
		return err
	}

	apiLn, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	localLn, err := ListenLocal(*socketDir, wiring.AgentSocketName)
	if err != nil {
		apiLn.Close()
		return err
	}
	healthLn, err := net.Listen("tcp", *health)
	if err != nil {
		apiLn.Close()
		localLn.Close()
		return fmt.Errorf("--health-listen: %w", err)
	}
	hmux := http.NewServeMux()
	ok := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }
	hmux.HandleFunc("/healthz", ok)
	hmux.HandleFunc("/readyz", ok)
	hmux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))

	servers := []struct {
		name string
		srv  *http.Server
		ln   net.Listener
		tls  bool
	}{
		{"api", &http.Server{Handler: Handler(a), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second}, apiLn, true},
		{"local", &http.Server{Handler: LocalHandler(a, runtime, log), ReadHeaderTimeout: 10 * time.Second, ConnContext: LocalConnContext}, localLn, false},
		{"health", &http.Server{Handler: hmux, ReadHeaderTimeout: 10 * time.Second}, healthLn, false},
	}
	errc := make(chan error, len(servers))
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if s.tls {
				err = s.srv.ServeTLS(s.ln, "", "")
			} else {
				err = s.srv.Serve(s.ln)
			}
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("%s server: %w", s.name, err)
			}
		}()
	}
	log.Info().Str("api", apiLn.Addr().String()).Str("health", healthLn.Addr().String()).Str("socket", localLn.Addr().String()).Str("node", *node).Msg("agent serving")
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, s := range servers {
		_ = s.srv.Shutdown(sctx)
	}
	wg.Wait()
	return runErr
}
