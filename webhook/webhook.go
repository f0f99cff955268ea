// Package webhook is `stasis webhook`: the admission webhooks that hold evictions and Job suspends
// until the node agent has checkpointed the pods, and wire checkpoint-enabled pods at creation so
// they can be checkpointed and restored.
//
// Paths: /validate/eviction, /validate/job-suspend, /mutate/pod, /mutate/job (see
// deploy/base/webhook-configurations.yaml). Domain decisions live in eviction.go, suspend.go,
// podmutate.go, jobmutate.go, identity.go; HTTP concerns in review.go and server.go.
package webhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	kwhprometheus "github.com/slok/kubewebhook/v2/pkg/metrics/prometheus"
	"github.com/slok/kubewebhook/v2/pkg/model"
	kwhwebhook "github.com/slok/kubewebhook/v2/pkg/webhook"
	"github.com/slok/kubewebhook/v2/pkg/webhook/mutating"
	"github.com/slok/kubewebhook/v2/pkg/webhook/validating"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	corev1listers "k8s.io/client-go/listers/core/v1"
	policyv1listers "k8s.io/client-go/listers/policy/v1"
	"k8s.io/client-go/tools/record"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
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
)

// Config is the webhook's behaviour (the server's settings are in ServerConfig).
type Config struct {
	LabelPrefix string
	// WaitBudget is how long a request waits for a checkpoint before answering 429; it must stay
	// below the configuration's timeoutSeconds (30).
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
	// MaxBodyBytes bounds an admission request.
	MaxBodyBytes int64
}

func (c *Config) defaults() error {
	if c.LabelPrefix == "" {
		c.LabelPrefix = labels.DefaultPrefix
	}
	if c.WaitBudget == 0 {
		c.WaitBudget = 20 * time.Second
	}
	if c.WaitBudget < 0 || c.WaitBudget >= 30*time.Second {
		return fmt.Errorf("--wait-budget %s must be positive and below the webhook timeoutSeconds of 30s", c.WaitBudget)
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
	if c.MaxBodyBytes == 0 {
		// The API server's own limit for an object is 3 MiB; a review carries two of them.
		c.MaxBodyBytes = 7 << 20
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
	Client kubernetes.Interface
	// Pods lists checkpoint-enabled pods (the informer may be filtered on the mode label).
	Pods   corev1listers.PodLister
	PDBs   policyv1listers.PodDisruptionBudgetLister
	Agents AgentClient
	Locate Locator
	Events record.EventRecorder
	// Registry receives kubewebhook's and Stasis' metrics.
	Registry prometheus.Registerer
	Log      zerolog.Logger
	Now      func() time.Time
}

// Webhook holds the decisions of all four paths.
type Webhook struct {
	cfg     Config
	d       Deps
	store   *catalog.Store
	metrics *Metrics
}

// New validates cfg and builds the webhook.
func New(cfg Config, d Deps) (*Webhook, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if d.Client == nil || d.Pods == nil || d.PDBs == nil || d.Agents == nil || d.Locate == nil || d.Events == nil {
		return nil, errors.New("webhook: client, pod and PDB listers, agent client, locator and event recorder are required")
	}
	if d.Registry == nil {
		d.Registry = prometheus.NewRegistry()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	return &Webhook{cfg: cfg, d: d, store: &catalog.Store{Client: d.Client, Now: d.Now}, metrics: NewMetrics(d.Registry)}, nil
}

// Handler returns the mux with the four admission paths.
func (w *Webhook) Handler() (http.Handler, error) {
	rec, err := kwhprometheus.NewRecorder(kwhprometheus.RecorderConfig{Registry: w.d.Registry})
	if err != nil {
		return nil, err
	}
	klog := NewKubewebhookLogger(w.d.Log)
	mux := http.NewServeMux()
	add := func(path, id string, object func(*model.AdmissionReview) error, wh kwhwebhook.Webhook, err error) error {
		if err != nil {
			return fmt.Errorf("%s: %w", id, err)
		}
		mux.Handle(path, &reviewHandler{
			id: id, object: object, webhook: kwhwebhook.NewMeasuredWebhook(rec, wh),
			maxBody: w.cfg.MaxBodyBytes, log: w.d.Log, metrics: w.metrics,
		})
		return nil
	}
	ev, err := validating.NewWebhook(validating.WebhookConfig{ID: "eviction", Obj: &policyv1.Eviction{}, Validator: validating.ValidatorFunc(w.validateEviction), Logger: klog})
	if err := add(PathEviction, "eviction", objectOf[policyv1.Eviction]("policy Eviction", false), ev, err); err != nil {
		return nil, err
	}
	js, err := validating.NewWebhook(validating.WebhookConfig{ID: "job-suspend", Obj: &batchv1.Job{}, Validator: validating.ValidatorFunc(w.validateJobSuspend), Logger: klog})
	if err := add(PathJobSuspend, "job-suspend", objectOf[batchv1.Job]("batch/v1 Job", true), js, err); err != nil {
		return nil, err
	}
	mp, err := mutating.NewWebhook(mutating.WebhookConfig{ID: "pod", Obj: &corev1.Pod{}, Mutator: mutating.MutatorFunc(w.mutatePod), Logger: klog})
	if err := add(PathMutatePod, "pod", objectOf[corev1.Pod]("v1 Pod", false), mp, err); err != nil {
		return nil, err
	}
	mj, err := mutating.NewWebhook(mutating.WebhookConfig{ID: "job", Obj: &batchv1.Job{}, Mutator: mutating.MutatorFunc(w.mutateJob), Logger: klog})
	if err := add(PathMutateJob, "job", objectOf[batchv1.Job]("batch/v1 Job", false), mj, err); err != nil {
		return nil, err
	}
	return mux, nil
}
