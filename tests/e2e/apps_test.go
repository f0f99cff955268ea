//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// appCase is one entry of the application matrix: the workload (harness.App: image, command, how
// to read the app's state) and the check that the replacement continued with the state from
// before the drain.
type appCase struct {
	app     harness.App
	checked string // what check asserts, for the matrix
	// knownLimit, when set, is text of a failure Stasis does not handle yet (an Event's CRIU line):
	// an entry failing with it is recorded as a known limit in the matrix and does not fail the
	// test; one failing otherwise does. When the limit is gone the test says so.
	knownLimit string
	check      func(t *testing.T, r *harness.AppResult)
}

// appPod is a pod template as a user writes it: one container, the checkpoint-mode label and
// nothing else of Stasis.
func appPod(command []string, mod ...func(*corev1.PodSpec)) corev1.PodTemplateSpec {
	grace := int64(10)
	spec := corev1.PodSpec{
		RestartPolicy:                 corev1.RestartPolicyNever,
		TerminationGracePeriodSeconds: &grace,
		Containers: []corev1.Container{{
			Name: "app", Image: harness.AppsImage, ImagePullPolicy: corev1.PullIfNotPresent, Command: command,
		}},
	}
	for _, m := range mod {
		m(&spec)
	}
	return corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"memverge.ai/checkpoint-mode": "true"}},
		Spec:       spec,
	}
}

var appCases = []appCase{
	{
		app: harness.App{Name: "jvm", Version: "OpenJDK 17 (bookworm), default flags", Ticks: 8,
			Template: appPod([]string{"java", "/apps/Counter.java"})},
		checked: "counter continues; 4 worker threads alive, their work only grows; every heap block keeps its pattern",
		check: func(t *testing.T, r *harness.AppResult) {
			continues(t, r.Before, r.After)
			for _, l := range r.After.Lines {
				assert.Equal(t, "ok", l.Fields["heap"], "line %d: heap blocks", l.N)
				assert.Equal(t, "4", l.Fields["threads"], "line %d: worker threads", l.N)
			}
			assert.GreaterOrEqual(t, field(r.After.Lines, 0, "work"), field(r.Before.Lines, -1, "work"), "the workers' counts continue")
		},
	},
	{
		app: harness.App{Name: "http", Version: "Python 3.11 ThreadingHTTPServer", Ticks: 6,
			Template: appPod([]string{"python3", "/apps/server.py"}, func(s *corev1.PodSpec) {
				s.Containers[0].ReadinessProbe = &corev1.Probe{PeriodSeconds: 1, ProbeHandler: corev1.ProbeHandler{
					HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(8080)}}}
			}),
			Prepare: httpState(3), Read: httpState(1)},
		checked: "counter continues; readiness probe passes; GET /state: same start token, request count +1",
		check: func(t *testing.T, r *harness.AppResult) {
			continues(t, r.Before, r.After)
			assert.Equal(t, r.StateBefore["token"], r.StateAfter["token"], "the server drew its token at start: a restored server keeps it")
			assert.Equal(t, num(r.StateBefore["requests"])+1, num(r.StateAfter["requests"]), "requests counted before the drain are kept")
		},
	},
	{
		app: harness.App{Name: "redis", Version: "Redis 7.0 (bookworm), persistence off",
			Template: appPod([]string{"redis-server", "--save", "", "--appendonly", "no"}),
			Prepare:  redisWrite, Read: redisRead},
		checked: "same run_id (no restart), 200 keys written before are there, new connections are served",
		check: func(t *testing.T, r *harness.AppResult) {
			assert.Equal(t, r.StateBefore["run_id"], r.StateAfter["run_id"], "a restarted redis draws a new run_id")
			assert.Equal(t, "200", r.StateAfter["dbsize"], "keys written before the drain")
			assert.Equal(t, "value-177", r.StateAfter["key:177"])
			assert.Equal(t, "OK", r.StateAfter["set"], "a new client can write")
		},
	},
	{
		// The same with a client connected through the drain: the dump meets an established
		// TCP connection (the client, outside the app, ends with the old pod).
		app: harness.App{Name: "redis-client", Version: "Redis 7.0, a client connected during the drain",
			Template: appPod([]string{"redis-server", "--save", "", "--appendonly", "no"}),
			Prepare:  redisWrite, Read: redisRead, During: []string{"redis-cli", "-r", "-1", "-i", "0.2", "INCR", "ticks"}},
		checked: "as redis, with a client holding a connection while the checkpoint is taken",
		check: func(t *testing.T, r *harness.AppResult) {
			assert.Contains(t, r.StateBefore["during"], "5", "the client was connected and counting")
			assert.Equal(t, r.StateBefore["run_id"], r.StateAfter["run_id"], "a restarted redis draws a new run_id")
			assert.Equal(t, "201", r.StateAfter["dbsize"], "keys written before the drain, and the client's counter")
			assert.Equal(t, "OK", r.StateAfter["set"], "a new client can write")
		},
	},
	{
		app: harness.App{Name: "postgres", Version: "PostgreSQL 15 (bookworm), data on a PVC",
			Claims:   map[string]string{"pgdata": "1Gi"},
			Template: appPod(postgresCommand, postgresSpec),
			Prepare:  pgWrite, Read: pgRead},
		checked: "same postmaster start time (no restart, no crash recovery), 1000 committed rows, accepts new connections and writes",
		check: func(t *testing.T, r *harness.AppResult) {
			assert.Equal(t, r.StateBefore["started"], r.StateAfter["started"], "a restarted postmaster has a new start time")
			assert.Equal(t, "1000", r.StateAfter["rows"], "rows committed before the drain")
			assert.Equal(t, "1001", r.StateAfter["rows_after_insert"], "a new connection can write")
		},
	},
	{
		app: harness.App{Name: "pool", Version: "Python 3.11 multiprocessing Pool(2) + /dev/shm", Ticks: 8,
			Template: appPod([]string{"python3", "/apps/pool.py"})},
		checked: "counter continues; the same worker processes; shared-memory slots add up",
		check: func(t *testing.T, r *harness.AppResult) {
			continues(t, r.Before, r.After)
			for _, l := range r.After.Lines {
				assert.Equal(t, "ok", l.Fields["shm"], "line %d: shared memory", l.N)
			}
			// Each tick names the workers that took its tasks: after the restore they must be the
			// same processes as before (a cold-started pool has new ones).
			before := map[string]bool{}
			for _, l := range r.Before.Lines {
				for _, p := range strings.Split(l.Fields["workers"], ",") {
					before[p] = true
				}
			}
			for _, l := range r.After.Lines {
				for _, p := range strings.Split(l.Fields["workers"], ",") {
					assert.True(t, before[p], "line %d: worker %s was not a worker before the drain (%v)", l.N, p, before)
				}
			}
		},
	},
	{
		app: harness.App{Name: "logger", Version: "plain-pod example; Python app appending to a log in its writable layer",
			Kind: harness.AppPod, PodName: "my-checkpointed-pod", Selector: "memverge.ai/checkpoint-storage-volume=checkpointing", Ticks: 8},
		checked: "counter continues; the log file holds exactly the lines written before and after",
		check: func(t *testing.T, r *harness.AppResult) {
			continues(t, r.Before, r.After)
			for _, l := range r.After.Lines {
				assert.Equal(t, "ok", l.Fields["log"], "line %d: log file", l.N)
			}
		},
	},
	{
		app: harness.App{Name: "pipeline", Version: "bash 5.2 loop | gawk 5.2 (several processes)", Ticks: 8,
			Template: appPod([]string{"bash", "-c",
				`i=0; while :; do echo $i; i=$((i+1)); sleep 0.5; done | awk '{ s += $1; print $1, "sum=" s; fflush() }'`})},
		checked: "counter continues; awk's running sum is exact (its memory survived)",
		check: func(t *testing.T, r *harness.AppResult) {
			continues(t, r.Before, r.After)
			for _, l := range r.After.Lines {
				assert.Equal(t, strconv.Itoa(l.N*(l.N+1)/2), l.Fields["sum"], "line %d: awk's sum", l.N)
			}
		},
	},
}

// Postgres as the postgres user (uid 999 in the image), its data directory on the PVC (an init
// container hands the fresh volume to that user, as people do), initdb on first start only.
var postgresCommand = []string{"sh", "-c", `export PGDATA=/var/lib/postgresql/data/pg
[ -s "$PGDATA/PG_VERSION" ] || /usr/lib/postgresql/15/bin/initdb -U postgres --auth=trust >/dev/null
exec /usr/lib/postgresql/15/bin/postgres -c listen_addresses='*' -c unix_socket_directories=/tmp`}

func postgresSpec(s *corev1.PodSpec) {
	uid := int64(999)
	mount := []corev1.VolumeMount{{Name: "data", MountPath: "/var/lib/postgresql/data"}}
	s.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &uid}
	s.Containers[0].VolumeMounts = mount
	s.InitContainers = []corev1.Container{{Name: "chown", Image: harness.AppsImage, ImagePullPolicy: corev1.PullIfNotPresent,
		Command: []string{"sh", "-c", "chown 999:999 /var/lib/postgresql/data && chmod 0700 /var/lib/postgresql/data"}, VolumeMounts: mount}}
	s.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "pgdata"}}}}
}

// TestApps is the application matrix: each app runs as a user would write it, its node is
// drained, and the replacement on the other node must continue with the app's own state. The
// figures go to $STASIS_E2E_DIR/compatibility.{json,md}; with STASIS_E2E_UPDATE_DOCS=1 the table in
// docs/compatibility.md is replaced by this run's. STASIS_E2E_APPS=jvm,redis runs a subset.
func TestApps(t *testing.T) {
	require.NoError(t, importAppImages(), "application images")
	only := map[string]bool{}
	for _, a := range strings.Split(os.Getenv("STASIS_E2E_APPS"), ",") {
		if a != "" {
			only[a] = true
		}
	}
	var rows []harness.MatrixRow
	for _, c := range appCases {
		if len(only) > 0 && !only[c.app.Name] {
			continue
		}
		c := c
		t.Run(c.app.Name, func(t *testing.T) { rows = append(rows, runAppCase(t, c)) })
	}
	md, err := harness.WriteMatrix(env.Dir, rows)
	require.NoError(t, err)
	t.Logf("application matrix (%s):\n%s", filepath.Join(env.Dir, "compatibility.md"), md)
	if os.Getenv("STASIS_E2E_UPDATE_DOCS") != "" {
		require.NoError(t, harness.UpdateDoc(filepath.Join(env.Root, "docs", "compatibility.md"), md))
	}
}

func runAppCase(t *testing.T, c appCase) (row harness.MatrixRow) {
	ctx := context.Background()
	ns := newNamespace(t, "app-"+c.app.Name)
	a := c.app
	if a.Kind == harness.AppPod {
		a.Manifest = loggerManifest(t)
	}
	r, err := env.RunApp(ctx, ns, a)
	row = harness.NewMatrixRow(a, c.checked, r)
	defer func() {
		row.Passed = !t.Failed()
		if t.Failed() {
			row.Failure = failure(err, r)
		}
	}()
	if r != nil && r.OldPod != nil && r.NewPod != nil {
		t.Logf("%s: pod %s on %s → %s on %s; drain %s, replacement Ready %s after it; %s; dump %.2fs, checkpoint %d bytes",
			a.Name, r.OldPod.Name, r.OldPod.Spec.NodeName, r.NewPod.Name, r.NewPod.Spec.NodeName,
			r.DrainTook.Round(10*time.Millisecond), r.NewPodReadyAfter.Round(10*time.Millisecond), r.RestoreEvent, row.DumpSeconds, row.CheckpointBytes)
		t.Logf("state before %v, after %v", r.StateBefore, r.StateAfter)
	}
	if err != nil {
		if why := failure(err, r); c.knownLimit != "" && strings.Contains(why, c.knownLimit) {
			t.Logf("%s: known limit, not a failure of this test: %s", a.Name, why)
			row.KnownLimit, row.Failure = true, why
			return row
		}
		t.Errorf("%s: %v\nwarnings: %q", a.Name, err, r.Warnings)
		return row
	}
	if c.knownLimit != "" {
		defer func() {
			if !t.Failed() {
				t.Logf("%s: the known limit %q no longer shows: remove it from the entry", a.Name, c.knownLimit)
			}
		}()
	}
	assert.NotEqual(t, r.OldPod.Spec.NodeName, r.NewPod.Spec.NodeName, "the replacement must run on the other node")
	assert.True(t, r.Restored(), "the replacement must be restored, got %q; warnings %q", r.RestoreEvent, r.Warnings)
	c.check(t, r)
	return row
}

// failure is the matrix's account of a failed entry: the error, the checkpoint and restore
// Events, and where the app's output broke.
func failure(err error, r *harness.AppResult) string {
	// The Events say it as the user sees it; the error only when there is none.
	var parts []string
	if r != nil {
		said := map[string]bool{} // the webhook and the agent both record a failed checkpoint
		for _, w := range r.Warnings {
			if !strings.Contains(w, "CheckpointFailed") && !strings.Contains(w, "RestoreFailed") {
				continue
			}
			w = condense(w)
			key := w
			if i := strings.Index(w, "criu reported failure"); i >= 0 {
				key = w[i:]
			}
			if !said[key] {
				said[key] = true
				parts = append(parts, w)
			}
		}
	}
	if err != nil && len(parts) == 0 {
		msg := err.Error()
		if i := strings.Index(msg, "\nEvents:"); i >= 0 {
			msg = msg[:i]
		}
		parts = append(parts, condense(msg))
	}
	if r != nil {
		if len(r.Before.Lines) > 0 || len(r.After.Lines) > 0 {
			parts = append(parts, fmt.Sprintf("output: last line before %d, first after %d, fresh starts after %d",
				r.Before.Last(), r.After.First(), r.After.FreshStarts))
		}
	}
	return strings.Join(dedup(parts), "; ")
}

// harmlessCRIU are CRIU error lines that every restore on these nodes logs and that fail nothing
// (no tun device in the container, no CAP_SYS_RESOURCE on this VM, CRIU's cgroup helper at exit).
var harmlessCRIU = []string{"criu/tun.c", "RLIMIT_NOFILE", "cgroupd: recv req error", "Restoring FAILED", "Dumping FAILED"}

// condense keeps an Event's or error's first sentence and CRIU's telling error lines.
func condense(msg string) string {
	lines := strings.Split(msg, "\n")
	head := lines[0]
	if i := strings.Index(head, "criu reported failure"); i >= 0 {
		head = head[:i] + "criu reported failure"
	}
	out := []string{head}
	seen := map[string]bool{}
next:
	for _, l := range lines[1:] {
		i := strings.Index(l, "Error (")
		if i < 0 || strings.Contains(l, "exited, status=") {
			continue
		}
		for _, h := range harmlessCRIU {
			if strings.Contains(l, h) {
				continue next
			}
		}
		if e := strings.TrimSpace(l[i:]); !seen[e] {
			seen[e] = true
			out = append(out, "`"+e+"`")
		}
	}
	if len(out) == 1 && len(head) > 400 {
		out[0] = head[:400] + "…"
	}
	return strings.Join(out, " ")
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

var appImages struct {
	once sync.Once
	err  error
}

// importAppImages builds the application images (cached) and imports them into both nodes, once.
func importAppImages() error {
	appImages.once.Do(func() {
		if env.Local == nil {
			appImages.err = fmt.Errorf("the application images exist only on the local cluster")
			return
		}
		t0 := time.Now()
		tar, err := harness.BuildAppImages(env.Root)
		if err == nil {
			err = env.Local.Import(tar)
		}
		appImages.err = err
		logf("application images built and imported into both nodes in %s", since(t0))
	})
	return appImages.err
}

// loggerManifest is docs/examples/plain-pod.yaml as written, with the cluster's storage class and
// the logger image (its entrypoint is the app: the example sets no command).
func loggerManifest(t *testing.T) string {
	raw, err := os.ReadFile(filepath.Join(env.Root, "docs", "examples", "plain-pod.yaml"))
	require.NoError(t, err)
	return strings.NewReplacer("<storage-class-name>", cluster.DefaultStorageClass, "my-image:latest", harness.LoggerImage).Replace(string(raw))
}

// httpState GETs /state n times from inside the pod and returns the last answer's fields.
func httpState(n int) func(context.Context, *harness.Env, *corev1.Pod) (map[string]string, error) {
	return func(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
		script := fmt.Sprintf(`import urllib.request
for _ in range(%d): b = urllib.request.urlopen("http://127.0.0.1:8080/state", timeout=5).read()
print(b.decode())`, n)
		out, err := e.ExecUntil(ctx, pod, time.Minute, "python3", "-c", script)
		if err != nil {
			return nil, err
		}
		var st map[string]any
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return nil, fmt.Errorf("GET /state answered %q: %w", out, err)
		}
		m := map[string]string{}
		for k, v := range st {
			m[k] = fmt.Sprint(v)
		}
		return m, nil
	}
}

func redisWrite(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
	if _, err := e.ExecUntil(ctx, pod, time.Minute, "redis-cli", "PING"); err != nil {
		return nil, err
	}
	out, err := e.Exec(ctx, pod, "sh", "-c", `for i in $(seq 1 200); do echo "SET key:$i value-$i"; done | redis-cli`)
	if n := strings.Count(out, "OK"); err != nil || n != 200 {
		return nil, fmt.Errorf("200 SETs: %d OK, %v", n, err)
	}
	return redisState(ctx, e, pod, false)
}

func redisRead(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
	if _, err := e.ExecUntil(ctx, pod, time.Minute, "redis-cli", "PING"); err != nil {
		return nil, err
	}
	return redisState(ctx, e, pod, true)
}

func redisState(ctx context.Context, e *harness.Env, pod *corev1.Pod, write bool) (map[string]string, error) {
	m := map[string]string{}
	info, err := e.Exec(ctx, pod, "redis-cli", "INFO", "server")
	if err != nil {
		return nil, err
	}
	for _, l := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), ":"); ok && (k == "run_id" || k == "uptime_in_seconds") {
			m[k] = v
		}
	}
	for _, q := range [][]string{{"dbsize", "DBSIZE"}, {"key:177", "GET", "key:177"}} {
		out, err := e.Exec(ctx, pod, append([]string{"redis-cli"}, q[1:]...)...)
		if err != nil {
			return nil, err
		}
		m[q[0]] = strings.TrimSpace(out)
	}
	if write {
		out, err := e.Exec(ctx, pod, "redis-cli", "SET", "after", "drain")
		if err != nil {
			return nil, err
		}
		m["set"] = strings.TrimSpace(out)
	}
	return m, nil
}

func psql(ctx context.Context, e *harness.Env, pod *corev1.Pod, sql string) (string, error) {
	out, err := e.Exec(ctx, pod, "psql", "-h", "/tmp", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql)
	return strings.TrimSpace(out), err
}

func pgWrite(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
	if _, err := e.ExecUntil(ctx, pod, 2*time.Minute, "psql", "-h", "/tmp", "-U", "postgres", "-Atc", "select 1"); err != nil {
		return nil, err
	}
	if _, err := psql(ctx, e, pod, "create table t (n int primary key, v text); insert into t select i, md5(i::text) from generate_series(1, 1000) i"); err != nil {
		return nil, err
	}
	return pgState(ctx, e, pod)
}

func pgRead(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
	if _, err := e.ExecUntil(ctx, pod, time.Minute, "psql", "-h", "/tmp", "-U", "postgres", "-Atc", "select 1"); err != nil {
		return nil, err
	}
	m, err := pgState(ctx, e, pod)
	if err != nil {
		return nil, err
	}
	if _, err := psql(ctx, e, pod, "insert into t values (1001, 'after the drain')"); err != nil {
		return m, err
	}
	m["rows_after_insert"], err = psql(ctx, e, pod, "select count(*) from t")
	return m, err
}

func pgState(ctx context.Context, e *harness.Env, pod *corev1.Pod) (map[string]string, error) {
	out, err := psql(ctx, e, pod, "select pg_postmaster_start_time(), (select count(*) from t)")
	if err != nil {
		return nil, err
	}
	started, rows, _ := strings.Cut(out, "|")
	return map[string]string{"started": started, "rows": rows}, nil
}

// field is a numeric field of line i (negative: from the end); -1 when absent.
func field(lines []harness.CounterLine, i int, key string) int {
	if i < 0 {
		i += len(lines)
	}
	if i < 0 || i >= len(lines) {
		return -1
	}
	return num(lines[i].Fields[key])
}

func num(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}
