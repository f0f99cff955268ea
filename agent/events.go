package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/stasis-k8s/stasis/agentapi"
)

// kubeEvents records Events on pods through the API server (needs RBAC: create events).
type kubeEvents struct {
	client kubernetes.Interface
	node   string
	log    zerolog.Logger
}

// NewKubeEvents returns an EventRecorder from a kubeconfig file, or the in-cluster configuration
// when kubeconfig is empty and the agent runs in a pod with a token; nil when neither is available
// (the agent then only logs what it would have recorded).
func NewKubeEvents(kubeconfig, node string, log zerolog.Logger) (EventRecorder, error) {
	var cfg *rest.Config
	var err error
	switch {
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	case os.Getenv("KUBERNETES_SERVICE_HOST") != "":
		if _, serr := os.Stat("/var/run/secrets/kubernetes.io/serviceaccount/token"); serr != nil {
			return nil, nil
		}
		cfg, err = rest.InClusterConfig()
	default:
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &kubeEvents{client: cs, node: node, log: log}, nil
}

func (k *kubeEvents) PodEvent(ctx context.Context, pod agentapi.PodRef, warning bool, reason, message string) {
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	now := metav1.NewTime(time.Now())
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + ".stasis-", Namespace: pod.Namespace},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace,
			Name: pod.Name, UID: types.UID(pod.UID)},
		Reason: reason, Message: message, Type: typ,
		Source:         corev1.EventSource{Component: "stasis-agent", Host: k.node},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: "stasis.dev/agent", ReportingInstance: "stasis-agent-" + k.node,
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := k.client.CoreV1().Events(pod.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		k.log.Warn().Err(err).Str("reason", reason).Msg("could not record an Event")
	}
}
