package main

// The hostile tenant's tools beyond --hostile (e2e hostile suite, tests/e2e/hostile_test.go).
//
// --swap DIR,FILE,TARGET... runs as a sidecar of a checkpointed container, sharing its checkpoint
// volume and the emptyDir that holds a checkpoint-files path: it loops, swapping DIR (the
// container's checkpoint directory as the sidecar sees it, and every entry in it) and FILE for
// symlinks to each TARGET and back, while the agent dumps the other container. It never stops.
//
// --hunt ADDR... looks for the agents' manifest key from inside a wired pod: every URL path of
// the agent's channel, the agents' own ports at ADDR (pod IPs), the API server with the pod's
// ServiceAccount token, and /proc of the pod. Whatever any route answers is appended to HuntLoot
// (the container's filesystem, where the test looks for the key's bytes); each route's outcome is
// printed ("hunt: ...").

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// HuntLoot is where --hunt keeps everything it read.
const HuntLoot = "/tmp/hunt-loot"

// swapLoop swaps dir's entries, dir itself and file for symlinks to each target after delay (the
// app has written its file by then), until SIGTERM (every path put back first).
func swapLoop(dir, file string, targets []string, delay time.Duration) {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	time.Sleep(delay)
	_ = os.MkdirAll(dir, 0o755)
	_ = os.MkdirAll(filepath.Dir(file), 0o755)
	fmt.Printf("swap: %s and %s for symlinks to %q\n", dir, file, targets)
	n, last := 0, time.Now()
	for {
		select {
		case <-stop:
			fmt.Printf("swap: stopped after %d swaps\n", n)
			os.Exit(0)
		default:
		}
		for _, t := range targets {
			n += swapFor(file, t)
			n += swapFor(dir, t)
			if ents, err := os.ReadDir(dir); err == nil {
				for _, e := range ents {
					if !strings.HasSuffix(e.Name(), ".swapped") {
						n += swapFor(filepath.Join(dir, e.Name()), t)
					}
				}
			}
		}
		if time.Since(last) > 5*time.Second {
			fmt.Printf("swap: %d swaps\n", n)
			last = time.Now()
		}
	}
}

// swapFor moves p aside, puts a symlink to target in its place for a moment, and moves p back.
// p need not exist (a symlink then appears where the agent may create p).
func swapFor(p, target string) int {
	aside := p + ".swapped"
	moved := os.Rename(p, aside) == nil
	if os.Symlink(target, p) != nil {
		if moved {
			_ = os.Rename(aside, p)
		}
		return 0
	}
	time.Sleep(time.Millisecond)
	_ = os.Remove(p)
	if moved {
		_ = os.Rename(aside, p)
	}
	time.Sleep(200 * time.Microsecond)
	return 1
}

// hunt tries every route to the agents' key it knows and keeps whatever it gets in HuntLoot.
func hunt(agents []string) {
	loot, err := os.OpenFile(HuntLoot, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fail("hunt: %v", err)
	}
	defer loot.Close()
	keep := func(route string, b []byte) {
		fmt.Fprintf(loot, "=== %s\n", route)
		loot.Write(b)
		loot.Write([]byte("\n"))
	}
	huntChannel(keep)
	for _, a := range agents {
		huntAgentPorts(a, keep)
	}
	huntAPIServer(keep)
	huntProc(keep)
	fmt.Println("hunt: done")
}

// httpGet performs one request without keeping a connection (CRIU refuses to dump a process
// holding a socket to the outside) and returns the status and body.
func httpGet(c *http.Client, method, url string) (int, []byte, error) {
	var body io.Reader
	if method == http.MethodPost {
		body = strings.NewReader("{}")
	}
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return 0, nil, err
	}
	if tok, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/token"); err == nil && strings.HasPrefix(url, "https://"+os.Getenv("KUBERNETES_SERVICE_HOST")) {
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, b, nil
}

func client(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	t := &http.Transport{DisableKeepAlives: true, DialContext: dial,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} // the attacker checks nothing
	return &http.Client{Timeout: 5 * time.Second, Transport: t}
}

func report(route string, code int, b []byte, err error, keep func(string, []byte)) {
	if err != nil {
		fmt.Printf("hunt: %s: %v\n", route, err)
		keep(route, []byte(err.Error()))
		return
	}
	first, _, _ := strings.Cut(string(bytes.TrimSpace(b)), "\n")
	if len(first) > 100 {
		first = first[:100]
	}
	fmt.Printf("hunt: %s: %d %s\n", route, code, first)
	keep(route, b)
}

// huntChannel asks the agent's channel every path it might serve besides the launchers' two.
func huntChannel(keep func(string, []byte)) {
	c := client(func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", "@stasis-agent")
	})
	for i := 0; i < 20; i++ { // the agent opens the channel a moment after the pod's sandbox
		if conn, err := net.Dial("unix", "@stasis-agent"); err == nil {
			conn.Close()
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	uid := os.Getenv("STASIS_POD_UID")
	paths := []string{"/", "/v1", "/v1/", "/v1/key", "/v1/manifest-key", "/v1/checkpoints", "/v1/checkpoints/" + uid,
		"/v1/entrypoint?podUID=" + uid + "&container=counter", "/v1/restore", "/metrics", "/healthz", "/readyz",
		"/debug/pprof/", "/debug/pprof/heap", "/debug/vars", "/../../etc/stasis/agent-tls/tls.key", "/etc/stasis/agent-tls/tls.key"}
	for _, p := range paths {
		for _, m := range []string{http.MethodGet, http.MethodPost} {
			code, b, err := httpGet(c, m, "http://agent"+p)
			report("channel "+m+" "+p, code, b, err, keep)
		}
	}
}

// huntAgentPorts tries the agent's health port and its mTLS API without a client certificate.
func huntAgentPorts(addr string, keep func(string, []byte)) {
	c := client(nil)
	for _, u := range []string{"http://" + addr + ":8081/metrics", "http://" + addr + ":8081/readyz",
		"http://" + addr + ":8081/debug/pprof/", "https://" + addr + ":9443/v1/checkpoints",
		"https://" + addr + ":9443/debug/pprof/"} {
		code, b, err := httpGet(c, http.MethodGet, u)
		report("agent "+u, code, b, err, keep)
	}
}

// huntAPIServer asks the API server for the agents' Secret with the pod's own token.
func huntAPIServer(keep func(string, []byte)) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" {
		fmt.Println("hunt: api: no KUBERNETES_SERVICE_HOST")
		return
	}
	base := "https://" + net.JoinHostPort(host, port)
	c := client(nil)
	for _, p := range []string{"/api/v1/namespaces/stasis-system/secrets/stasis-agent-tls",
		"/api/v1/namespaces/stasis-system/secrets", "/api/v1/secrets"} {
		code, b, err := httpGet(c, http.MethodGet, base+p)
		report("api "+p, code, b, err, keep)
	}
}

// huntProc reads what /proc shows of every process the pod can see.
func huntProc(keep func(string, []byte)) {
	ents, _ := os.ReadDir("/proc")
	read := 0
	for _, e := range ents {
		if e.Name() == "" || e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		for _, f := range []string{"environ", "cmdline", "status", "mountinfo", "maps"} {
			p := filepath.Join("/proc", e.Name(), f)
			if b, err := os.ReadFile(p); err == nil {
				keep(p, b)
				read++
			}
		}
	}
	for _, p := range []string{"/proc/net/unix", "/proc/self/mountinfo", "/proc/keys"} {
		if b, err := os.ReadFile(p); err == nil {
			keep(p, b)
			read++
		}
	}
	fmt.Printf("hunt: proc: read %d files\n", read)
}
