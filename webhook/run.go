package webhook

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/labels"
)

// runFlags are the command line of `stasis webhook` besides Config and ServerConfig.
type runFlags struct {
	kubeconfig, agentCA, agentCert, agentKey, agentNS, agentSelector, agentEndpoint string
	defaultSize, logLevel, dumpSpeed                                                string
	agentPort                                                                       int
	// Client rate limits per lane (client-go's own defaults, 5 QPS / burst 10, are far too low
	// for a cluster component: issue 13).
	kube, pod, evict limits
}

type limits struct {
	qps   float64
	burst int
}

func (l *limits) flags(fs *flag.FlagSet, prefix, what string, qps float64, burst int) {
	fs.Float64Var(&l.qps, prefix+"qps", qps, "API requests per second of "+what)
	fs.IntVar(&l.burst, prefix+"burst", burst, "API request burst of "+what)
}

func parseFlags(args []string) (runFlags, Config, ServerConfig, error) {
	fs := flag.NewFlagSet("webhook", flag.ContinueOnError)
	var f runFlags
	var cfg Config
	var srv ServerConfig
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file; empty = in-cluster configuration")
	fs.StringVar(&f.agentCA, "agent-ca-file", "", "CA bundle that signed the agents' serving certificates (verified with server name "+agentapi.ServerName+")")
	fs.StringVar(&f.agentCert, "agent-cert-file", "", "client certificate presented to agents (identity "+agentapi.WebhookIdentity+"); reloaded on change")
	fs.StringVar(&f.agentKey, "agent-key-file", "", "key of --agent-cert-file")
	fs.StringVar(&f.agentNS, "agent-namespace", "stasis-system", "namespace of the agent pods")
	fs.StringVar(&f.agentSelector, "agent-selector", "app.kubernetes.io/name=stasis-agent", "label selector of the agent pods")
	fs.IntVar(&f.agentPort, "agent-port", agentapi.DefaultPort, "agents' mTLS API port")
	fs.StringVar(&f.agentEndpoint, "agent-endpoint", "", "one agent URL used for every node instead of finding agent pods (tests, single-node setups); http:// disables TLS")
	fs.StringVar(&f.defaultSize, "default-volume-size", "10Gi", "size of a Stasis-created checkpoint PVC when the pod has no memory limits and no checkpoint-volume-size label")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.kube.flags(fs, "kube-", "the background work (informers, PVC controller, Events)", 50, 100)
	f.pod.flags(fs, "pod-", "pod-creation reviews (claims of NonIndexed Job slots, reads the caches cannot answer)", 50, 100)
	f.evict.flags(fs, "eviction-", "eviction and Job-suspend reviews (checkpoint records, claim checks)", 50, 100)
	fs.StringVar(&srv.Listen, "listen", ":8443", "TLS address of the admission endpoints")
	fs.StringVar(&srv.HealthListen, "health-listen", ":8080", "plain HTTP address of /healthz, /readyz and /metrics")
	fs.StringVar(&srv.CertFile, "tls-cert-file", "", "serving certificate (PEM); reloaded when it changes")
	fs.StringVar(&srv.KeyFile, "tls-key-file", "", "key of the serving certificate (PEM)")
	fs.DurationVar(&srv.ShutdownDelay, "shutdown-delay", 5*time.Second, "on SIGTERM, serve on (not ready) this long before closing the listeners, while the API server still sends reviews to this replica")
	fs.StringVar(&cfg.LabelPrefix, "label-prefix", labels.DefaultPrefix, "prefix of the checkpoint labels (must match the webhook configuration's selectors)")
	fs.DurationVar(&cfg.AgentRetryFor, "agent-retry-for", 2*time.Minute, "how long an eviction or suspend is answered 429 while the node's agent is unavailable (restarting, not ready, unreachable) before the failure policy applies")
	fs.DurationVar(&cfg.WaitBudget, "wait-budget", 20*time.Second, "how long an eviction or suspend waits for a checkpoint before answering 429; below the eviction deadline")
	fs.StringVar(&cfg.FailurePolicy, "failure-policy", FailClosed, "when a checkpoint fails: fail-closed (deny the eviction/suspend) or fail-open (allow, progress is lost)")
	fs.StringVar(&cfg.ToolsImage, "tools-image", "", "image of the tools and restore init-containers (the Stasis agent image)")
	fs.IntVar(&cfg.KeepCheckpoints, "keep-checkpoints", 1, "complete checkpoints kept per container besides the newest (passed to agents)")
	fs.DurationVar(&cfg.PodTimeout, "pod-timeout", 15*time.Second, "timeoutSeconds of pods.stasis.dev in the webhook configuration (the API server's ?timeout= wins when shorter)")
	fs.DurationVar(&cfg.EvictionTimeout, "eviction-timeout", 30*time.Second, "timeoutSeconds of evictions.stasis.dev and job-suspends.stasis.dev")
	fs.DurationVar(&cfg.JobTimeout, "job-timeout", 10*time.Second, "timeoutSeconds of jobs.stasis.dev and deployments.stasis.dev")
	fs.DurationVar(&cfg.DeadlineMargin, "deadline-margin", 2*time.Second, "a review is answered this long before its timeout (429, retry) if not decided by then")
	fs.IntVar(&cfg.MaxPodReviews, "max-pod-reviews", 64, "pod- and Job-creation reviews in flight; beyond, 429 with Retry-After at once")
	fs.IntVar(&cfg.MaxEvictionReviews, "max-eviction-reviews", 512, "eviction and Job-suspend reviews in flight (each may wait for a dump); beyond, 429 at once")
	fs.DurationVar(&cfg.RetryAfter, "retry-after", time.Second, "Retry-After of a shed or timed-out review")
	fs.StringVar(&f.dumpSpeed, "dump-speed", "200Mi", "dump speed per second assumed when warning at wiring that a pod's terminationGracePeriodSeconds is too short for its memory (measured: about 1Gi to a local disk; a network volume is slower)")
	fs.DurationVar(&cfg.DumpOverhead, "dump-overhead", DefaultDumpOverhead, "fixed time of a dump (freeze, CRIU start, manifest) added to the memory at --dump-speed for that warning")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stasis webhook [flags]\n\nServe the admission webhooks: %s, %s, %s, %s, %s.\n\nFlags:\n",
			PathEviction, PathJobSuspend, PathMutatePod, PathMutateJob, PathMutateDeployment)
		fs.PrintDefaults()
	}
	if err := flagenv.Parse(fs, args); err != nil {
		return f, cfg, srv, err
	}
	q, err := resource.ParseQuantity(f.defaultSize)
	if err != nil || q.Sign() <= 0 {
		return f, cfg, srv, fmt.Errorf("--default-volume-size %q is not a positive size (e.g. 10Gi)", f.defaultSize)
	}
	cfg.DefaultVolumeSize = q
	speed, err := resource.ParseQuantity(f.dumpSpeed)
	if err != nil || speed.Sign() <= 0 {
		return f, cfg, srv, fmt.Errorf("--dump-speed %q is not a positive size per second (e.g. 200Mi)", f.dumpSpeed)
	}
	cfg.DumpSpeed = speed.Value()
	for name, l := range map[string]limits{"--kube": f.kube, "--pod": f.pod, "--eviction": f.evict} {
		if l.qps <= 0 || l.burst < 1 {
			return f, cfg, srv, fmt.Errorf("%s-qps %v and %s-burst %d must be positive", name, l.qps, name, l.burst)
		}
	}
	// Refuse bad settings before connecting to anything.
	if err := cfg.defaults(); err != nil {
		return f, cfg, srv, err
	}
	return f, cfg, srv, srv.defaults()
}

// Run is `stasis webhook`.
func Run(ctx context.Context, args []string) error {
	f, cfg, srv, err := parseFlags(args)
	if err != nil {
		return err
	}
	lvl, err := zerolog.ParseLevel(f.logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := zerolog.New(os.Stderr).Level(lvl).With().Timestamp().Str("component", "webhook").Logger()
	restCfg, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client configuration: %w", err)
	}
	clients, err := newClients(restCfg, f)
	if err != nil {
		return err
	}
	agents, err := agentClient(ctx, f.agentEndpoint, f.agentCA, f.agentCert, f.agentKey, log)
	if err != nil {
		return err
	}
	c, err := startCaches(ctx, clients[0], cfg.LabelPrefix, f)
	if err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: clients[0].CoreV1().Events("")})
	defer broadcaster.Shutdown()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	wh, err := New(cfg, Deps{
		Client: clients[0], PodClient: clients[1], EvictionClient: clients[2],
		Pods: c.pods.Lister(), PDBs: c.pdbs, PVCs: c.pvcs.Lister(), ReplicaSets: c.rs, Deployments: c.deploy, Nodes: c.nodes, Synced: c.synced,
		Agents: agents, Locate: c.locate, Registry: reg, Log: log,
		Events: broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "stasis-webhook"}),
	})
	if err != nil {
		return err
	}
	handler, err := wh.Handler()
	if err != nil {
		return err
	}
	pvcs := NewPVCController(wh, c.pvcs.Lister())
	if _, err := c.pods.Informer().AddEventHandler(pvcs.Handler()); err != nil {
		return err
	}
	if _, err := c.pods.Informer().AddEventHandler(wh.ClaimsHandler()); err != nil {
		return err
	}
	go func() {
		if cache.WaitForCacheSync(ctx.Done(), c.hasSynced...) {
			log.Info().Msg("informer caches synced: ready")
			pvcs.Run(ctx, 2)
		}
	}()
	log.Info().Str("labelPrefix", cfg.LabelPrefix).Dur("waitBudget", cfg.WaitBudget).Str("failurePolicy", cfg.FailurePolicy).
		Str("toolsImage", cfg.ToolsImage).Str("agentEndpoint", f.agentEndpoint).Dur("podTimeout", cfg.PodTimeout).
		Dur("evictionTimeout", cfg.EvictionTimeout).Dur("deadlineMargin", cfg.DeadlineMargin).Int("maxPodReviews", cfg.MaxPodReviews).
		Float64("podQPS", f.pod.qps).Float64("evictionQPS", f.evict.qps).Msg("starting")
	return Serve(ctx, srv, handler, reg, c.synced, log)
}

// newClients returns the three clients (background, pod path, eviction path), each with its own
// rate limiter: a flood on one path cannot spend the tokens of another.
func newClients(base *rest.Config, f runFlags) ([3]kubernetes.Interface, error) {
	var out [3]kubernetes.Interface
	for i, l := range []limits{f.kube, f.pod, f.evict} {
		c := rest.CopyConfig(base)
		c.UserAgent = []string{"stasis-webhook", "stasis-webhook/pod", "stasis-webhook/eviction"}[i]
		c.QPS, c.Burst = float32(l.qps), l.burst
		cs, err := kubernetes.NewForConfig(c)
		if err != nil {
			return out, err
		}
		out[i] = cs
	}
	return out, nil
}
