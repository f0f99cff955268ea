package webhook

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
)

// Run is `stasis webhook`.
func Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("webhook", flag.ContinueOnError)
	var (
		srv           ServerConfig
		cfg           Config
		kubeconfig    = fs.String("kubeconfig", "", "kubeconfig file; empty = in-cluster configuration")
		agentCA       = fs.String("agent-ca-file", "", "CA bundle that signed the agents' serving certificates (verified with server name "+agentapi.ServerName+")")
		agentCert     = fs.String("agent-cert-file", "", "client certificate presented to agents (identity "+agentapi.WebhookIdentity+"); reloaded on change")
		agentKey      = fs.String("agent-key-file", "", "key of --agent-cert-file")
		agentNS       = fs.String("agent-namespace", "stasis-system", "namespace of the agent pods")
		agentSelector = fs.String("agent-selector", "app.kubernetes.io/name=stasis-agent", "label selector of the agent pods")
		agentPort     = fs.Int("agent-port", agentapi.DefaultPort, "agents' mTLS API port")
		agentEndpoint = fs.String("agent-endpoint", "", "one agent URL used for every node instead of finding agent pods (tests, single-node setups); http:// disables TLS")
		defaultSize   = fs.String("default-volume-size", "10Gi", "size of a Stasis-created checkpoint PVC when the pod has no memory limits and no checkpoint-volume-size label")
		logLevel      = fs.String("log-level", "info", "log level: debug, info, warn, error")
	)
	fs.StringVar(&srv.Listen, "listen", ":8443", "TLS address of the admission endpoints")
	fs.StringVar(&srv.HealthListen, "health-listen", ":8080", "plain HTTP address of /healthz, /readyz and /metrics")
	fs.StringVar(&srv.CertFile, "tls-cert-file", "", "serving certificate (PEM); reloaded when it changes")
	fs.StringVar(&srv.KeyFile, "tls-key-file", "", "key of the serving certificate (PEM)")
	fs.StringVar(&cfg.LabelPrefix, "label-prefix", labels.DefaultPrefix, "prefix of the checkpoint labels (must match the webhook configuration's selectors)")
	fs.DurationVar(&cfg.WaitBudget, "wait-budget", 20*time.Second, "how long a request waits for a checkpoint before answering 429; below the webhook timeoutSeconds (30)")
	fs.StringVar(&cfg.FailurePolicy, "failure-policy", FailClosed, "when a checkpoint fails: fail-closed (deny the eviction/suspend) or fail-open (allow, progress is lost)")
	fs.StringVar(&cfg.ToolsImage, "tools-image", "", "image of the tools and restore init-containers (the Stasis agent image)")
	fs.IntVar(&cfg.KeepCheckpoints, "keep-checkpoints", 1, "complete checkpoints kept per container besides the newest (passed to agents)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stasis webhook [flags]\n\nServe the admission webhooks: %s, %s, %s, %s.\n\nFlags:\n",
			PathEviction, PathJobSuspend, PathMutatePod, PathMutateJob)
		fs.PrintDefaults()
	}
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	lvl, err := zerolog.ParseLevel(*logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := zerolog.New(os.Stderr).Level(lvl).With().Timestamp().Str("component", "webhook").Logger()
	q, err := resource.ParseQuantity(*defaultSize)
	if err != nil || q.Sign() <= 0 {
		return fmt.Errorf("--default-volume-size %q is not a positive size (e.g. 10Gi)", *defaultSize)
	}
	cfg.DefaultVolumeSize = q
	// Refuse bad settings before connecting to anything.
	if err := cfg.defaults(); err != nil {
		return err
	}
	if err := srv.defaults(); err != nil {
		return err
	}

	restCfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client configuration: %w", err)
	}
	restCfg.UserAgent = "stasis-webhook"
	// client-go's default (5 QPS, burst 10) throttles admission reads, catalog writes, Events and
	// the PVC controller against each other: measured here, a checkpoint PVC waited ≈ 200 ms for a
	// token after its pod appeared.
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}

	agents, err := agentClient(ctx, *agentEndpoint, *agentCA, *agentCert, *agentKey, log)
	if err != nil {
		return err
	}

	// Pods: only checkpoint-enabled ones (the mutating webhook only wires labelled pods), which
	// keeps the cache small on large clusters.
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.LabelSelector = labels.Key(cfg.LabelPrefix, labels.Mode) + "=true"
	}))
	podInf := podFactory.Core().V1().Pods()
	pdbFactory := informers.NewSharedInformerFactory(client, 0)
	pdbInf := pdbFactory.Policy().V1().PodDisruptionBudgets()
	// Stasis' own PVCs, for the PVC controller (it creates the ones wired pods name).
	pvcFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.LabelSelector = catalog.LabelManaged + "=true"
	}))
	pvcInf := pvcFactory.Core().V1().PersistentVolumeClaims()
	synced := []cache.InformerSynced{podInf.Informer().HasSynced, pdbInf.Informer().HasSynced, pvcInf.Informer().HasSynced}

	var locate Locator
	if *agentEndpoint != "" {
		locate = StaticLocator(strings.TrimRight(*agentEndpoint, "/"))
	} else {
		sel, err := klabels.Parse(*agentSelector)
		if err != nil {
			return fmt.Errorf("--agent-selector: %w", err)
		}
		agentFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(*agentNS),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel.String() }))
		agentInf := agentFactory.Core().V1().Pods()
		synced = append(synced, agentInf.Informer().HasSynced)
		locate = PodLocator{Pods: agentInf.Lister().Pods(*agentNS), Selector: sel, Port: *agentPort}
		agentFactory.Start(ctx.Done())
	}
	podFactory.Start(ctx.Done())
	pdbFactory.Start(ctx.Done())
	pvcFactory.Start(ctx.Done())

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "stasis-webhook"})

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	wh, err := New(cfg, Deps{
		Client: client, Pods: podInf.Lister(), PDBs: pdbInf.Lister(), Agents: agents, Locate: locate,
		Events: recorder, Registry: reg, Log: log,
	})
	if err != nil {
		return err
	}
	handler, err := wh.Handler()
	if err != nil {
		return err
	}
	pvcs := NewPVCController(wh, pvcInf.Lister())
	if _, err := podInf.Informer().AddEventHandler(pvcs.Handler()); err != nil {
		return err
	}
	ready := func() bool {
		for _, s := range synced {
			if !s() {
				return false
			}
		}
		return true
	}
	go func() {
		if cache.WaitForCacheSync(ctx.Done(), synced...) {
			log.Info().Msg("informer caches synced: ready")
			pvcs.Run(ctx, 2)
		}
	}()
	log.Info().Str("labelPrefix", cfg.LabelPrefix).Dur("waitBudget", cfg.WaitBudget).Str("failurePolicy", cfg.FailurePolicy).
		Str("toolsImage", cfg.ToolsImage).Str("agentEndpoint", *agentEndpoint).Msg("starting")
	return Serve(ctx, srv, handler, reg, ready, log)
}

// agentClient builds the mTLS client to the agents: their CA, the fixed server name, and the
// webhook's client certificate (reloaded when it changes).
func agentClient(ctx context.Context, endpoint, caFile, certFile, keyFile string, log zerolog.Logger) (*agentapi.Client, error) {
	if strings.HasPrefix(endpoint, "http://") {
		return agentapi.NewClient(nil, 10*time.Second), nil
	}
	if caFile == "" {
		return nil, errors.New("--agent-ca-file is required to verify the agents (or an http:// --agent-endpoint for tests)")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--agent-ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--agent-ca-file %s holds no PEM certificate", caFile)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: agentapi.ServerName}
	if certFile != "" || keyFile != "" {
		if certFile == "" || keyFile == "" {
			return nil, errors.New("--agent-cert-file and --agent-key-file go together")
		}
		r, err := NewCertReloader(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("agent client certificate: %w", err)
		}
		go r.Watch(ctx, 30*time.Second, log)
		tc.GetClientCertificate = r.GetClientCertificate
	}
	return agentapi.NewClient(tc, 10*time.Second), nil
}
