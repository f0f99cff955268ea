package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/checkpoint/namespacekeys"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/internal/serving"
	"github.com/stasis-k8s/stasis/wiring"
)

// RunConfig is the command line of `stasis agent` (every flag also reads STASIS_<FLAG>).
type RunConfig struct {
	Listen, HealthListen                       string
	CertFile, KeyFile, ClientCAFile            string
	NodeName, CRIEndpoint                      string
	CriuPath                                   string
	MaxConcurrentDumps, KeepOlder              int
	MinConcurrentDumps                         int
	FreezeTimeout, DumpTimeout, RestoreTimeout time.Duration
	ReleaseAfter                               time.Duration
	StateDir                                   string
	SocketDir, Kubeconfig                      string
	ManifestKeyFile, RestoreDir                string
	LazyRestore                                string
	EncryptCheckpoints                         bool
	LogLevel                                   string
}

// flags binds the configuration to fs, with the defaults of a DaemonSet pod.
func (c *RunConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", fmt.Sprintf(":%d", agentapi.DefaultPort), "address of the mTLS agent API")
	fs.StringVar(&c.CertFile, "tls-cert-file", "", "serving certificate (must carry the name "+agentapi.ServerName+"); reloaded on change")
	fs.StringVar(&c.KeyFile, "tls-key-file", "", "serving key; reloaded on change")
	fs.StringVar(&c.ManifestKeyFile, "manifest-key-file", "", "secret the key that signs checkpoint manifests is derived from, the same on every node and readable by the agents only (default: --tls-key-file, kept across renewals)")
	fs.StringVar(&c.RestoreDir, "restore-dir", os.TempDir(), "the agent's private working directory: the image streamer's sockets, CRIU's restore logs (small; never the pod's volume)")
	fs.StringVar(&c.ClientCAFile, "client-ca-file", "", "CA that signs client certificates; only "+agentapi.WebhookIdentity+" may start dumps")
	fs.StringVar(&c.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (downward API spec.nodeName)")
	fs.StringVar(&c.CRIEndpoint, "cri-endpoint", "unix:///run/containerd/containerd.sock", "CRI socket of the container runtime")
	fs.StringVar(&c.CriuPath, "criu-path", "/usr/local/lib/stasis/criu/criu", "the CRIU bundle of the agent image (its wrapper `criu`): the only CRIU the agent runs")
	fs.IntVar(&c.MaxConcurrentDumps, "max-concurrent-dumps", DefaultMaxConcurrentDumps, "most dumps running at once on this node: the ceiling of the scheduler, which starts at --min-concurrent-dumps and adds a dump at a time while the node's checkpoint throughput (bytes/s of finished dumps) grows by 10% or more (measured on a 2-core node: the knee at 2, more only lengthened each freeze; docs/agent.md)")
	fs.IntVar(&c.MinConcurrentDumps, "min-concurrent-dumps", 1, "dumps at once the scheduler starts from and never goes below; equal to --max-concurrent-dumps for a fixed limit")
	fs.DurationVar(&c.FreezeTimeout, "freeze-timeout", 5*time.Minute, "thaw a dumped app whose pod is not deleted within this time")
	fs.StringVar(&c.StateDir, "state-dir", filepath.Join(wiring.HostAgentDir, "state"), "host directory (a tmpfs: /run) where the agent records the apps it keeps frozen, so that a restarted agent takes them over")
	fs.DurationVar(&c.ReleaseAfter, "release-after", 15*time.Second, "thaw a dumped app whose pod is not being deleted this long after the webhook last asked about its checkpoint (an eviction refused by a PodDisruptionBudget)")
	fs.DurationVar(&c.DumpTimeout, "dump-timeout", 15*time.Minute, "abandon one container's dump after this time")
	fs.DurationVar(&c.RestoreTimeout, "restore-timeout", 5*time.Minute, "start a container afresh when its restore takes longer")
	fs.StringVar(&c.LazyRestore, "lazy-restore", LazyRestoreAuto, "auto: a restored app resumes before all its memory is read back (CRIU lazy pages, each page verified before it is mapped) when this kernel offers non-cooperative userfaultfd, else a full restore; off: always a full restore")
	fs.BoolVar(&c.EncryptCheckpoints, "encrypt-checkpoints", true, "encrypt checkpoint chunks with AES-256-GCM under a data key per checkpoint wrapped by the namespace's key (a checkpoint holds whatever the app held in memory); false stores them in the clear, still checked on read (docs/agent.md: its cost measured)")
	fs.IntVar(&c.KeepOlder, "keep-checkpoints", 1, "older complete checkpoints kept per container besides the newest (a request's keep wins)")
	fs.StringVar(&c.HealthListen, "health-listen", ":8081", "plain HTTP address for /healthz, /readyz and /metrics")
	fs.StringVar(&c.SocketDir, "socket-dir", wiring.HostAgentDir, "directory of the launchers' local socket "+wiring.AgentSocketName)
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig for recording Events (default: in-cluster when a token is mounted, else no Events)")
	fs.StringVar(&c.LogLevel, "log-level", "info", "zerolog level")
}

// Run is `stasis agent`.
func Run(ctx context.Context, args []string) error {
	var rc RunConfig
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	rc.flags(fs)
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	lvl, err := zerolog.ParseLevel(rc.LogLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := zerolog.New(os.Stderr).Level(lvl).With().Timestamp().Str("component", "stasis-agent").Logger()
	if rc.NodeName == "" {
		return errors.New("--node-name is required (set NODE_NAME from the downward API)")
	}
	// Version gate: refuse to run with a CRIU that cannot dump on this kernel.
	bundle, v, err := criurun.CheckVersion(rc.CriuPath)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	log.Info().Str("criu", criurun.FormatVersion(v)).Str("path", rc.CriuPath).Msg("CRIU version gate passed")
	tlsCfg, certReady, err := serverTLS(rc.CertFile, rc.KeyFile, rc.ClientCAFile)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	runtime, err := DialCRI(rc.CRIEndpoint)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	defer runtime.Close()
	keyFile := rc.ManifestKeyFile
	if keyFile == "" {
		keyFile = rc.KeyFile
	}
	key, err := checkpoint.KeyFromFile(keyFile)
	if err != nil {
		return fmt.Errorf("agent: --manifest-key-file: %w", err)
	}
	a, reg, err := newAgent(ctx, rc, bundle, v, key, runtime, log)
	if err != nil {
		return err
	}
	servers, local, err := rc.servers(a, runtime, tlsCfg, reg, serving.Check{Name: "serving certificate", Check: certReady}, serving.Check{Name: "container runtime", Check: runtime.Ping})
	if err != nil {
		return err
	}
	log.Info().Str("api", servers[0].Ln.Addr().String()).Str("socket", servers[1].Ln.Addr().String()).
		Str("health", servers[2].Ln.Addr().String()).Str("node", rc.NodeName).Msg("agent serving")
	// The launchers' channel inside every wired pod's network namespace (wiring.AgentSocket).
	pods := &PodSockets{Local: local, Lister: runtime, Log: log}
	go func() { _ = pods.Run(ctx) }()
	go a.RunPeriodic(ctx, runtime, periodicTick)
	return serving.Group{Servers: servers}.Run(ctx)
}

// periodicTick is how often the agent looks for due periodic checkpoints.
const periodicTick = 5 * time.Second

// newAgent builds the agent with its Event recorder and metrics registry.
func newAgent(ctx context.Context, rc RunConfig, criu criurun.Bundle, criuVersion int, key checkpoint.Key, runtime *CRI, log zerolog.Logger) (*Agent, *prometheus.Registry, error) {
	events, err := NewKubeEvents(rc.Kubeconfig, rc.NodeName, log)
	if err != nil {
		return nil, nil, fmt.Errorf("agent: %w", err)
	}
	if events == nil {
		log.Info().Msg("no Kubernetes client: Events are logged only")
	}
	var pods PodStates
	var keks checkpoint.KEKSource
	if k, ok := events.(*kubeEvents); ok && k != nil {
		pods = k
		keks = namespacekeys.New(k.client, time.Minute)
	} else {
		log.Info().Msg("no Kubernetes client: namespace keys are derived from the manifest key")
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a, err := New(ctx, Config{
		NodeName: rc.NodeName, Criu: criu, CriuVersion: criuVersion, ManifestKey: key, NamespaceKeys: keks, RestoreDir: rc.RestoreDir,
		MaxConcurrentDumps: rc.MaxConcurrentDumps, MinConcurrentDumps: rc.MinConcurrentDumps, FreezeTimeout: rc.FreezeTimeout, DumpTimeout: rc.DumpTimeout,
		RestoreTimeout: rc.RestoreTimeout, KeepOlder: rc.KeepOlder, LazyRestore: rc.LazyRestore, PlainCheckpoints: !rc.EncryptCheckpoints,
		ReleaseAfter: rc.ReleaseAfter, Pods: pods, StateDir: rc.StateDir,
		Finder: runtime, Events: events, Metrics: NewMetrics(reg), Log: log,
	})
	return a, reg, err
}

// servers opens the three listeners (mTLS API, local socket, health) and their servers, in
// that order. Every server bounds how long a client may take to send and receive.
func (rc RunConfig) servers(a *Agent, runtime *CRI, tlsCfg *tls.Config, reg *prometheus.Registry, checks ...serving.Check) ([]serving.Server, *Local, error) {
	apiLn, err := net.Listen("tcp", rc.Listen)
	if err != nil {
		return nil, nil, fmt.Errorf("--listen: %w", err)
	}
	localLn, err := ListenLocal(rc.SocketDir, wiring.AgentSocketName)
	if err != nil {
		apiLn.Close()
		return nil, nil, err
	}
	sockReady, err := socketCheck(filepath.Join(rc.SocketDir, wiring.AgentSocketName))
	var healthLn net.Listener
	if err == nil {
		if healthLn, err = net.Listen("tcp", rc.HealthListen); err != nil {
			err = fmt.Errorf("--health-listen: %w", err)
		}
	}
	if err != nil {
		apiLn.Close()
		localLn.Close()
		return nil, nil, err
	}
	checks = append(checks, serving.Check{Name: "local socket", Check: sockReady})
	local := NewLocal(a, LocalConfig{Pods: runtime, Entrypoints: runtime})
	return []serving.Server{
		{Name: "api", HTTP: apiServer(a, tlsCfg), Ln: apiLn, TLS: true},
		{Name: "local", HTTP: local.Server(), Ln: local.Listener(localLn)},
		{Name: "health", HTTP: serving.Health(reg, checks...), Ln: healthLn},
	}, local, nil
}

func apiServer(a *Agent, tlsCfg *tls.Config) *http.Server {
	return &http.Server{Handler: Handler(a), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: 30 * time.Second, WriteTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10}
}
