// Package webhook is `stasis webhook`: the admission webhooks that hold evictions and Job suspends
// until the node agent has checkpointed the pods, and wire checkpoint-enabled pods at creation so
// they can be checkpointed and restored.
//
// Paths: /validate/eviction, /validate/job-suspend, /mutate/pod, /mutate/job, /mutate/deployment (see
// deploy/base/webhook-configurations.yaml). Domain decisions live in eviction.go, suspend.go,
// podmutate.go, jobmutate.go, identity.go; HTTP concerns in review.go and server.go.
package webhook

import (
	"context"
	"errors"
	"fmt"
	"k8s.io/client-go/tools/cache"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	appsv1listers "k8s.io/client-go/listers/apps/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	policyv1listers "k8s.io/client-go/listers/policy/v1"
	"k8s.io/client-go/tools/record"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
)

// Failure policies for a failed checkpoint.
const (
	FailClosed = "fail-closed"
	FailOpen   = "fail-open"
)

// Paths served on the TLS listener.
const (
	PathEviction   = "/validate/eviction"
	PathJobSuspend = "/validate/job-suspend"
	PathMutatePod  = "/mutate/pod"
	PathMutateJob  = "/mutate/job"
	// PathMutateDeployment sets the Recreate strategy on checkpointed Deployments.
	PathMutateDeployment = "/mutate/deployment"
)

// Config is the webhook's behaviour (the server's settings are in ServerConfig).
type Config struct {
	LabelPrefix string
	// WaitBudget is how long a request waits for a checkpoint before answering 429; it must stay
	// below the eviction deadline (EvictionTimeout minus DeadlineMargin).
	WaitBudget time.Duration
	// PollInterval between status requests to an agent.
	PollInterval  time.Duration
	FailurePolicy string
	ToolsImage    string
	// DefaultVolumeSize for a Stasis-created PVC when the pod has neither memory limits nor the label.
	DefaultVolumeSize resource.Quantity
	// KeepCheckpoints is passed to agents: complete checkpoints kept per container besides the newest.
	KeepCheckpoints int
	// ClaimGrace keeps a NonIndexed Job slot claimed while its pod is not yet visible.
	ClaimGrace time.Duration
	// AgentRetryFor is how long an unavailable agent (restarting, not ready, unreachable) is
	// answered 429 for a pod before the failure policy applies (default 2m; negative: at once).
	AgentRetryFor time.Duration
	// DumpSpeed (bytes per second) and DumpOverhead are the dump time assumed by the warning at
	// wiring when a pod's grace period is short for its memory (see graceWarning).
	DumpSpeed    int64
	DumpOverhead time.Duration
	// MaxBodyBytes bounds an admission request.
	MaxBodyBytes int64

	// The configurations' timeoutSeconds per path (deploy/base/webhook-configurations.yaml); the
	// API server's ?timeout= wins when it is shorter. A review answers DeadlineMargin before it.
	PodTimeout, EvictionTimeout, JobTimeout time.Duration
	DeadlineMargin                          time.Duration
	// MaxPodReviews bounds pod-creation reviews in flight; MaxEvictionReviews eviction and
	// suspend reviews (they wait for dumps, so they hold a slot for seconds). Beyond: 429 at once.
	MaxPodReviews, MaxEvictionReviews int
	// RetryAfter is what a shed or timed-out review asks the client to wait.
	RetryAfter time.Duration
}

func (c *Config) defaults() error {
	if c.LabelPrefix == "" {
		c.LabelPrefix = labels.DefaultPrefix
	}
	if err := c.reviewDefaults(); err != nil {
		return err
	}
	if c.WaitBudget == 0 {
		c.WaitBudget = 20 * time.Second
	}
	if limit := c.EvictionTimeout - c.DeadlineMargin; c.WaitBudget < 0 || c.WaitBudget >= limit {
		return fmt.Errorf("--wait-budget %s must be positive and below the eviction deadline of %s (--eviction-timeout %s minus --deadline-margin %s)",
			c.WaitBudget, limit, c.EvictionTimeout, c.DeadlineMargin)
	}
	if c.PollInterval == 0 {
		c.PollInterval = 250 * time.Millisecond
	}
	switch c.FailurePolicy {
	case "":
		c.FailurePolicy = FailClosed
	case FailClosed, FailOpen:
	default:
		return fmt.Errorf("--failure-policy %q is not %s or %s", c.FailurePolicy, FailClosed, FailOpen)
	}
	if c.ToolsImage == "" {
		return errors.New("--tools-image is required: the image of the tools and restore init-containers (the Stasis agent image)")
	}
	if c.DefaultVolumeSize.IsZero() {
		c.DefaultVolumeSize = resource.MustParse("10Gi")
	}
	if c.ClaimGrace == 0 {
		c.ClaimGrace = time.Minute
	}
	if c.AgentRetryFor == 0 {
		c.AgentRetryFor = 2 * time.Minute
	}
	if c.DumpSpeed == 0 {
		c.DumpSpeed = DefaultDumpSpeed
	}
	if c.DumpOverhead == 0 {
		c.DumpOverhead = DefaultDumpOverhead
	}
	if c.DumpSpeed < 0 || c.DumpOverhead < 0 {
		return fmt.Errorf("--dump-speed %d and --dump-overhead %s must be positive", c.DumpSpeed, c.DumpOverhead)
	}
	if c.MaxBodyBytes == 0 {
		// The API server's own limit for an object is 3 MiB; a review carries two of them.
		c.MaxBodyBytes = 7 << 20
	}
	return nil
}

// reviewDefaults fills and checks the deadline and bulkhead settings.
func (c *Config) reviewDefaults() error {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	// The timeoutSeconds of deploy/base/webhook-configurations.yaml.
	def(&c.PodTimeout, 15*time.Second)
	def(&c.EvictionTimeout, 30*time.Second)
	def(&c.JobTimeout, 10*time.Second)
	def(&c.DeadlineMargin, 2*time.Second)
	def(&c.RetryAfter, time.Second)
	if c.MaxPodReviews == 0 {
		c.MaxPodReviews = 64
	}
	if c.MaxEvictionReviews == 0 {
		c.MaxEvictionReviews = 512
	}
	for name, d := range map[string]time.Duration{"--pod-timeout": c.PodTimeout, "--eviction-timeout": c.EvictionTimeout, "--job-timeout": c.JobTimeout} {
		if d <= c.DeadlineMargin || d > 30*time.Second {
			return fmt.Errorf("%s %s must be above --deadline-margin %s and at most 30s (the API server's limit for timeoutSeconds)", name, d, c.DeadlineMargin)
		}
	}
	if c.MaxPodReviews < 0 || c.MaxEvictionReviews < 0 || c.RetryAfter < 0 || c.DeadlineMargin < 0 {
		return errors.New("--max-pod-reviews, --max-eviction-reviews, --retry-after and --deadline-margin must not be negative")
	}
	return nil
}

// AgentClient is what the webhook needs from agentapi.Client.
type AgentClient interface {
	Checkpoint(ctx context.Context, base string, req agentapi.CheckpointRequest) (agentapi.CheckpointStatus, error)
	Status(ctx context.Context, base, uid string) (agentapi.CheckpointStatus, error)
	Delete(ctx context.Context, base, uid string) error
}

// Locator finds the agent of a node.
type Locator interface {
	URL(node string) (string, error)
}

// Deps are the webhook's collaborators.
type Deps struct {
	// Client is for the background work (PVC controller); PodClient and EvictionClient, each with
	// its own rate limiter, for the pod-creation and the eviction/suspend reviews (nil: Client).
	Client, PodClient, EvictionClient kubernetes.Interface
	// Pods lists checkpoint-enabled pods (the informer may be filtered on the mode label).
	Pods corev1listers.PodLister
	PDBs policyv1listers.PodDisruptionBudgetLister
	// PVCs, ReplicaSets and Deployments are informer caches: what reviews read instead of the API
	// server. nil reads live (unit tests of the live path).
	PVCs        corev1listers.PersistentVolumeClaimLister
	ReplicaSets appsv1listers.ReplicaSetLister
	Deployments appsv1listers.DeploymentLister
	// Nodes is the Node informer cache: an eviction from a NotReady or gone node is allowed
	// without a checkpoint (nodes.go). nil: every node counts as ready.
	Nodes corev1listers.NodeLister
	// Synced reports whether the caches are synced; until then every review is answered 429
	// (an empty cache would allow the eviction of a checkpoint-enabled pod unchecked). nil: synced.
	Synced func() bool
	Agents AgentClient
	Locate Locator
	Events record.EventRecorder
	// Registry receives Stasis' metrics.
	Registry prometheus.Registerer
	Log      zerolog.Logger
	Now      func() time.Time
}

// Webhook holds the decisions of all four paths.
type Webhook struct {
	cfg Config
	d   Deps
	// The bulkheads: pod-creation reviews, eviction/suspend reviews, background work.
	pod, evict, ctrl lane
	metrics          *Metrics
	gone             *goneClaims     // claim tokens of pods seen deleted (claimgone.go)
	unavail          *unavailability // since when each pod's agent has been unavailable (transient.go)
}

// ClaimsHandler is the pod informer handler that frees a deleted pod's NonIndexed Job slot at once.
func (w *Webhook) ClaimsHandler() cache.ResourceEventHandler { return w.gone.Handler() }

// New validates cfg and builds the webhook.
func New(cfg Config, d Deps) (*Webhook, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if d.Client == nil || d.Pods == nil || d.PDBs == nil || d.Agents == nil || d.Locate == nil || d.Events == nil {
		return nil, errors.New("webhook: client, pod and PDB listers, agent client, locator and event recorder are required")
	}
	if d.PodClient == nil {
		d.PodClient = d.Client
	}
	if d.EvictionClient == nil {
		d.EvictionClient = d.Client
	}
	if d.Registry == nil {
		d.Registry = prometheus.NewRegistry()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	return &Webhook{cfg: cfg, d: d, metrics: NewMetrics(d.Registry),
		pod: newLane("pod", d.PodClient, d, d.Now), evict: newLane("eviction", d.EvictionClient, d, d.Now),
		ctrl: newLane("background", d.Client, d, d.Now), gone: &goneClaims{}, unavail: &unavailability{}}, nil
}

// forReview is the webhook as one review sees it: a dry run records no Event (it changes nothing,
// and a flood of dry runs must not become a flood of Events).
func (w *Webhook) forReview(dryRun bool) *Webhook {
	if !dryRun {
		return w
	}
	c := *w
	c.d.Events = &record.FakeRecorder{} // without a channel it drops every Event
	return &c
}

// Handler returns the mux with the admission paths.
func (w *Webhook) Handler() (http.Handler, error) {
	podSlots, evictSlots := make(chan struct{}, w.cfg.MaxPodReviews), make(chan struct{}, w.cfg.MaxEvictionReviews)
	paths := map[string]*path{
		PathEviction: {id: "eviction", decode: decodeEviction, decide: (*Webhook).validateEviction,
			timeout: w.cfg.EvictionTimeout, slots: evictSlots},
		PathJobSuspend: {id: "job-suspend", decode: decodeObject[batchv1.Job]("batch/v1 Job", true), decide: (*Webhook).validateJobSuspend,
			timeout: w.cfg.EvictionTimeout, slots: evictSlots},
		PathMutatePod: {id: "pod", mutating: true, decode: decodeObject[corev1.Pod]("v1 Pod", false), decide: (*Webhook).mutatePod,
			timeout: w.cfg.PodTimeout, slots: podSlots},
		// Job creation is pure (no read, no write): it shares the pod path's bulkhead.
		PathMutateJob: {id: "job", mutating: true, decode: decodeObject[batchv1.Job]("batch/v1 Job", false), decide: (*Webhook).mutateJob,
			timeout: w.cfg.JobTimeout, slots: podSlots},
		PathMutateDeployment: {id: "deployment", mutating: true, decode: decodeObject[appsv1.Deployment]("apps/v1 Deployment", false), decide: (*Webhook).mutateDeployment,
			timeout: w.cfg.JobTimeout, slots: podSlots},
	}
	mux := http.NewServeMux()
	for route, p := range paths {
		mux.Handle(route, &reviewHandler{w: w, p: p, log: w.d.Log, m: w.metrics, cfg: &w.cfg, sync: w.d.Synced})
	}
	return mux, nil
}

// decodeEviction decodes the Eviction; `kubectl drain --dry-run=server` puts its dry run in the
// Eviction's deleteOptions (request.dryRun stays false): the review counts as a dry run.
func decodeEviction(rv *review) error {
	if err := decodeObject[policyv1.Eviction]("policy Eviction", false)(rv); err != nil {
		return err
	}
	rv.DryRun = DryRunEviction(rv.DryRun, rv.obj.(*policyv1.Eviction))
	return nil
}
