package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/wiring"
)

// Labels the kubelet puts on every container it creates through CRI.
const (
	labelPodUID        = "io.kubernetes.pod.uid"
	labelContainerName = "io.kubernetes.container.name"
)

// CRI finds containers and image configurations through the container runtime's CRI socket.
type CRI struct {
	conn    *grpc.ClientConn
	runtime runtimeapi.RuntimeServiceClient
	images  runtimeapi.ImageServiceClient

	sandboxPIDs sync.Map // sandbox ID → pause PID (WiredSandboxes)
}

// DialCRI connects to a CRI endpoint ("unix:///run/containerd/containerd.sock" or a plain path).
func DialCRI(endpoint string) (*CRI, error) {
	if endpoint == "" {
		return nil, fmt.Errorf("--cri-endpoint is empty")
	}
	if !strings.Contains(endpoint, "://") {
		endpoint = "unix://" + endpoint
	}
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("CRI endpoint %s: %w", endpoint, err)
	}
	return &CRI{conn: conn, runtime: runtimeapi.NewRuntimeServiceClient(conn), images: runtimeapi.NewImageServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *CRI) Close() error { return c.conn.Close() }

// container returns the running container of a pod by name.
func (c *CRI) container(ctx context.Context, podUID, name string) (*runtimeapi.Container, error) {
	resp, err := c.runtime.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{
		State:         &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING},
		LabelSelector: map[string]string{labelPodUID: podUID, labelContainerName: name},
	}})
	if err != nil {
		return nil, fmt.Errorf("CRI ListContainers: %w", err)
	}
	switch len(resp.Containers) {
	case 0:
		return nil, fmt.Errorf("no running container %q in pod %s on this node", name, podUID)
	case 1:
		return resp.Containers[0], nil
	}
	// Restarts leave one running container at most; take the newest to be safe.
	newest := resp.Containers[0]
	for _, ct := range resp.Containers[1:] {
		if ct.CreatedAt > newest.CreatedAt {
			newest = ct
		}
	}
	return newest, nil
}

// Find implements ProcessFinder: the container's init PID from ContainerStatus verbose info.
func (c *CRI) Find(ctx context.Context, pod agentapi.PodRef, name string) (Target, error) {
	ct, err := c.container(ctx, pod.UID, name)
	if err != nil {
		return Target{}, err
	}
	st, err := c.runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: ct.Id, Verbose: true})
	if err != nil {
		return Target{}, fmt.Errorf("CRI ContainerStatus %s: %w", ct.Id, err)
	}
	pid, err := verbosePID(st.Info, "CRI ContainerStatus "+ct.Id)
	if err != nil {
		return Target{}, err
	}
	t := Target{PID: pid, ImageRef: st.GetStatus().GetImageRef(), Attempt: ct.GetMetadata().GetAttempt()}
	if img := st.GetStatus().GetImage(); img != nil {
		t.Image = img.Image
	}
	if ns := st.GetStatus().GetStartedAt(); ns > 0 {
		t.Started = time.Unix(0, ns)
	}
	for _, m := range st.GetStatus().GetMounts() {
		t.Mounts = append(t.Mounts, Mount{ContainerPath: m.ContainerPath, HostPath: m.HostPath, ReadOnly: m.Readonly})
	}
	sb, err := c.runtime.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: ct.PodSandboxId})
	if err != nil {
		return Target{}, fmt.Errorf("CRI PodSandboxStatus %s: %w", ct.PodSandboxId, err)
	}
	t.PodAnnotations = sb.GetStatus().GetAnnotations()
	return t, nil
}

// Entrypoint returns an image's ENTRYPOINT/CMD from ImageStatus verbose info (the OCI image
// config). The container's resolved image reference is preferred over the pod spec's name.
func (c *CRI) Entrypoint(ctx context.Context, podUID, container, image string) (agentapi.Entrypoint, error) {
	ref := image
	if podUID != "" && container != "" {
		if ct, err := c.container(ctx, podUID, container); err == nil && ct.ImageRef != "" {
			ref = ct.ImageRef
		}
	}
	if ref == "" {
		return agentapi.Entrypoint{}, fmt.Errorf("no image: give image= or a running pod container")
	}
	resp, err := c.images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}, Verbose: true})
	if err != nil {
		return agentapi.Entrypoint{}, fmt.Errorf("CRI ImageStatus %s: %w", ref, err)
	}
	if resp.Image == nil {
		return agentapi.Entrypoint{}, errImageNotFound{ref}
	}
	return parseImageInfo(resp.Info["info"], ref)
}

type errImageNotFound struct{ ref string }

func (e errImageNotFound) Error() string {
	return "image " + e.ref + " not found in the container runtime"
}

// parseImageInfo reads containerd's verbose ImageStatus info: {"imageSpec": <OCI image config>}.
func parseImageInfo(info, ref string) (agentapi.Entrypoint, error) {
	var v struct {
		ImageSpec struct {
			Config struct {
				Entrypoint []string `json:"Entrypoint"`
				Cmd        []string `json:"Cmd"`
				WorkingDir string   `json:"WorkingDir"`
			} `json:"config"`
		} `json:"imageSpec"`
	}
	if info == "" {
		return agentapi.Entrypoint{}, fmt.Errorf("CRI ImageStatus %s: no verbose info (the runtime does not expose the image config)", ref)
	}
	if err := json.Unmarshal([]byte(info), &v); err != nil {
		return agentapi.Entrypoint{}, fmt.Errorf("CRI ImageStatus %s: verbose info: %w", ref, err)
	}
	c := v.ImageSpec.Config
	return agentapi.Entrypoint{Entrypoint: c.Entrypoint, Cmd: c.Cmd, WorkingDir: c.WorkingDir, Image: ref}, nil
}

// errNotOnNode is a pod or container the runtime does not run (a caller's claim that cannot be
// true on this node).
type errNotOnNode struct{ what string }

func (e errNotOnNode) Error() string { return e.what + " is not running on this node" }

// PodByUID implements PodDirectory: the ready pod sandbox of a pod UID (CRI ListPodSandbox; the
// sandbox metadata is the kubelet's, not the pod's).
func (c *CRI) PodByUID(ctx context.Context, uid string) (agentapi.PodRef, error) {
	resp, err := c.runtime.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		State:         &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY},
		LabelSelector: map[string]string{labelPodUID: uid},
	}})
	if err != nil {
		return agentapi.PodRef{}, fmt.Errorf("CRI ListPodSandbox: %w", err)
	}
	for _, s := range resp.Items {
		if m := s.GetMetadata(); m != nil && m.Uid == uid {
			return agentapi.PodRef{Namespace: m.Namespace, Name: m.Name, UID: m.Uid}, nil
		}
	}
	return agentapi.PodRef{}, errNotOnNode{"pod " + uid}
}

// Container implements PodDirectory: a container of a pod that has started or is starting (its
// caller may run before the runtime records the container as running), with its init PID and
// image.
func (c *CRI) Container(ctx context.Context, podUID, id string) (RuntimeContainer, error) {
	resp, err := c.runtime.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{
		Id:            id,
		LabelSelector: map[string]string{labelPodUID: podUID},
	}})
	if err != nil {
		return RuntimeContainer{}, fmt.Errorf("CRI ListContainers: %w", err)
	}
	if len(resp.Containers) != 1 || resp.Containers[0].Id != id {
		return RuntimeContainer{}, errNotOnNode{"container " + id + " of pod " + podUID}
	}
	ct := resp.Containers[0]
	if s := ct.State; s != runtimeapi.ContainerState_CONTAINER_CREATED && s != runtimeapi.ContainerState_CONTAINER_RUNNING {
		return RuntimeContainer{}, errNotOnNode{"container " + id + " of pod " + podUID + " (" + s.String() + ")"}
	}
	pid, err := c.initPID(ctx, id)
	return RuntimeContainer{Name: ct.Labels[labelContainerName], PID: pid, ImageRef: ct.ImageRef}, err
}

// initPID is a container's init PID from ContainerStatus verbose info.
func (c *CRI) initPID(ctx context.Context, id string) (int, error) {
	st, err := c.runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		return 0, fmt.Errorf("CRI ContainerStatus %s: %w", id, err)
	}
	return verbosePID(st.Info, "CRI ContainerStatus "+id)
}

// verbosePID reads the "pid" of a CRI verbose info (containerd's; other runtimes may not say).
func verbosePID(info map[string]string, what string) (int, error) {
	var v struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(info["info"]), &v); err != nil || v.Pid <= 0 {
		return 0, fmt.Errorf("%s: no pid in the verbose info (runtime not supported?)", what)
	}
	return v.Pid, nil
}

// Ping asks the runtime its version: the readiness check of the CRI connection.
func (c *CRI) Ping(ctx context.Context) error {
	if _, err := c.runtime.Version(ctx, &runtimeapi.VersionRequest{}); err != nil {
		return fmt.Errorf("CRI Version: %w", err)
	}
	return nil
}

// WiredSandboxes implements SandboxLister: the ready sandboxes of pods the webhook wired (their
// annotation stasis.dev/wired), each with its pause process (whose network namespace is the
// pod's). A sandbox's PID is asked once.
func (c *CRI) WiredSandboxes(ctx context.Context) ([]Sandbox, error) {
	sbs, err := c.wiredSandboxes(ctx)
	if err != nil {
		return nil, err
	}
	var out []Sandbox
	live := map[string]bool{}
	for _, s := range sbs {
		live[s.Id] = true
		pid, ok := c.sandboxPIDs.Load(s.Id)
		if !ok {
			p, err := c.sandboxPID(ctx, s.Id)
			if err != nil {
				continue
			}
			c.sandboxPIDs.Store(s.Id, p)
			pid = p
		}
		out = append(out, Sandbox{ID: s.Id, PodUID: s.GetMetadata().GetUid(), PID: pid.(int)})
	}
	c.sandboxPIDs.Range(func(k, _ any) bool {
		if !live[k.(string)] {
			c.sandboxPIDs.Delete(k)
		}
		return true
	})
	return out, nil
}

// sandboxPID is a sandbox's pause process from PodSandboxStatus verbose info.
func (c *CRI) sandboxPID(ctx context.Context, id string) (int, error) {
	st, err := c.runtime.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	if err != nil {
		return 0, fmt.Errorf("CRI PodSandboxStatus %s: %w", id, err)
	}
	return verbosePID(st.Info, "CRI PodSandboxStatus "+id)
}

// WiredPods lists the node's ready wired pods with their sandbox annotations (periodic
// checkpoints).
func (c *CRI) WiredPods(ctx context.Context) ([]WiredPod, error) {
	sbs, err := c.wiredSandboxes(ctx)
	if err != nil {
		return nil, err
	}
	var out []WiredPod
	for _, s := range sbs {
		md := s.GetMetadata()
		out = append(out, WiredPod{Pod: agentapi.PodRef{Namespace: md.GetNamespace(), Name: md.GetName(), UID: md.GetUid()}, Annotations: s.Annotations})
	}
	return out, nil
}

// wiredSandboxes lists the ready sandboxes of the pods the webhook wired (annotation
// stasis.dev/wired).
func (c *CRI) wiredSandboxes(ctx context.Context) ([]*runtimeapi.PodSandbox, error) {
	resp, err := c.runtime.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY},
	}})
	if err != nil {
		return nil, fmt.Errorf("CRI ListPodSandbox: %w", err)
	}
	var out []*runtimeapi.PodSandbox
	for _, s := range resp.Items {
		if s.Annotations[wiring.AnnotationWired] == "true" {
			out = append(out, s)
		}
	}
	return out, nil
}
