// Command localcaller is a launcher-like client of the agent's local socket for the agent's tests:
// it joins a cgroup (as the kubelet would have placed a container's process), optionally tries to
// tamper with the socket directory or hold connections, makes one request and prints the outcome
// as JSON.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Result is what the caller prints.
type Result struct {
	Code       int    `json:"code"`
	Body       string `json:"body"`
	Err        string `json:"err,omitempty"`
	ReplaceErr string `json:"replaceErr,omitempty"`
	FloodErr   string `json:"floodErr,omitempty"`
}

func main() {
	socket := flag.String("socket", "", "agent socket")
	cgroup := flag.String("cgroup", "", "cgroup directory to join first")
	method := flag.String("method", http.MethodGet, "HTTP method")
	path := flag.String("path", agentapi.LocalPathEntrypoint, "path and query")
	body := flag.String("body", "", "request body")
	pad := flag.Int("pad", 0, "bytes of padding added to a RestoreRequest body's checkpointID")
	hold := flag.Int("hold", 0, "connections to open (and keep) before the request")
	replace := flag.Bool("replace", false, "try to remove the socket and write beside it first")
	waitStdin := flag.Bool("wait-stdin", false, "after printing, wait until stdin closes")
	flag.Parse()

	if *cgroup != "" {
		if err := os.WriteFile(filepath.Join(*cgroup, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			fail(err)
		}
	}
	var res Result
	if *replace {
		res.ReplaceErr = errString(os.Remove(*socket))
		res.FloodErr = errString(os.WriteFile(filepath.Join(filepath.Dir(*socket), "flood"), []byte("x"), 0o644))
	}
	var held []net.Conn
	for i := 0; i < *hold; i++ {
		c, err := net.Dial("unix", *socket)
		if err != nil {
			fail(err)
		}
		held = append(held, c)
	}
	b := *body
	if *pad > 0 {
		b = strings.Replace(b, `"checkpointID":"`, `"checkpointID":"`+strings.Repeat("x", *pad), 1)
	}
	c := agentapi.NewLocalClient(*socket, 10*time.Second)
	req, err := http.NewRequest(*method, agentapi.LocalBase+*path, bytes.NewBufferString(b))
	if err != nil {
		fail(err)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		res.Err = err.Error()
	} else {
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		res.Code, res.Body = resp.StatusCode, string(out)
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
	if *waitStdin {
		_, _ = io.Copy(io.Discard, os.Stdin)
	}
	for _, c := range held {
		c.Close()
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "localcaller:", err)
	os.Exit(2)
}
