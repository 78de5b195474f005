// Package goplugin checks the elide plugin against HashiCorp's real go-plugin client, set up
// exactly like Nomad's plugin loader (protocol version 2, Nomad's magic cookie, gRPC only, no
// AutoMTLS). Nomad's protos are not imported: our own proto files are compiled at test time
// with protocompile and called through dynamicpb messages, so the test proves OUR protos are
// wire-compatible with what the plugin serves. Configs go through hcl/v2 + hcldec with the
// spec the plugin returns, then go-cty msgpack: the same pipeline the Nomad agent runs.
package goplugin

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bufbuild/protocompile"
	"github.com/bufbuild/protocompile/linker"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/ext/typeexpr"
	"github.com/hashicorp/hcl/v2/hcldec"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	hcljson "github.com/hashicorp/hcl/v2/json"
	ctymsgpack "github.com/zclconf/go-cty/cty/msgpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

const (
	basePkg   = "hashicorp.nomad.plugins.base.proto"
	driverPkg = "hashicorp.nomad.plugins.drivers.proto"
)

// nomadHandshake is Nomad's base.Handshake.
var nomadHandshake = plugin.HandshakeConfig{
	ProtocolVersion:  2,
	MagicCookieKey:   "NOMAD_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255",
}

// rawConn hands back the plugin's *grpc.ClientConn; we call it with dynamic messages.
type rawConn struct{ plugin.NetRPCUnsupportedPlugin }

func (rawConn) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("client side only")
}

func (rawConn) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return c, nil
}

// syncBuffer collects the host logger's output from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func pluginBinary(t *testing.T) string {
	t.Helper()
	p := os.Getenv("ELIDE_PLUGIN_BIN")
	if p == "" {
		p = filepath.Join("..", "..", "target", "debug", "elide-task-driver")
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("plugin binary %s missing (run `cargo build --bins` or set ELIDE_PLUGIN_BIN): %v", abs, err)
	}
	return abs
}

type host struct {
	client *plugin.Client
	conn   *grpc.ClientConn
	logs   *syncBuffer
}

// launch starts the plugin the way Nomad's loader does and dispenses its gRPC connection.
func launch(t *testing.T) *host {
	t.Helper()
	logs := &syncBuffer{}
	logger := hclog.New(&hclog.LoggerOptions{Name: "host", Level: hclog.Trace, Output: logs, JSONFormat: true})
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  nomadHandshake,
		Plugins:          plugin.PluginSet{"driver": &rawConn{}},
		Cmd:              exec.Command(pluginBinary(t)),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           logger,
	})
	t.Cleanup(client.Kill)
	rpc, err := client.Client()
	if err != nil {
		t.Fatalf("handshake failed: %v\nhost log:\n%s", err, logs.String())
	}
	raw, err := rpc.Dispense("driver")
	if err != nil {
		t.Fatalf("dispense: %v", err)
	}
	if err := rpc.Ping(); err != nil {
		t.Fatalf("health ping (service \"plugin\"): %v", err)
	}
	return &host{client: client, conn: raw.(*grpc.ClientConn), logs: logs}
}

var (
	protosOnce sync.Once
	protos     linker.Files
	protosErr  error
)

func loadProtos(t *testing.T) linker.Files {
	t.Helper()
	protosOnce.Do(func() {
		c := protocompile.Compiler{
			Resolver: protocompile.WithStandardImports(&protocompile.SourceResolver{
				ImportPaths: []string{filepath.Join("..", "..", "proto")},
			}),
		}
		protos, protosErr = c.Compile(context.Background(),
			"plugins/base/proto/base.proto", "plugins/drivers/proto/driver.proto")
	})
	if protosErr != nil {
		t.Fatalf("compile our protos: %v", protosErr)
	}
	return protos
}

func newMsg(t *testing.T, name string) *dynamicpb.Message {
	t.Helper()
	d, err := loadProtos(t).AsResolver().FindDescriptorByName(protoreflect.FullName(name))
	if err != nil {
		t.Fatalf("message %s: %v", name, err)
	}
	return dynamicpb.NewMessage(d.(protoreflect.MessageDescriptor))
}

func field(m *dynamicpb.Message, name string) protoreflect.Value {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(name)))
}

func (h *host) unary(t *testing.T, method string, req, resp *dynamicpb.Message) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return h.conn.Invoke(ctx, method, req, resp)
}

func (h *host) pluginInfo(t *testing.T) *dynamicpb.Message {
	t.Helper()
	resp := newMsg(t, basePkg+".PluginInfoResponse")
	if err := h.unary(t, "/"+basePkg+".BasePlugin/PluginInfo", newMsg(t, basePkg+".PluginInfoRequest"), resp); err != nil {
		t.Fatalf("PluginInfo: %v", err)
	}
	return resp
}

// specJSON mirrors hclspec.Spec through protojson (proto field names).
type specJSON struct {
	Object *struct {
		Attributes map[string]*specJSON `json:"attributes"`
	} `json:"object"`
	Attr *struct {
		Name     string `json:"name"`
		Type     string `json:"type"`
		Required bool   `json:"required"`
	} `json:"Attr"`
	BlockValue *struct {
		Name     string    `json:"name"`
		Required bool      `json:"required"`
		Nested   *specJSON `json:"nested"`
	} `json:"block_value"`
	Default *struct {
		Primary *specJSON `json:"primary"`
		Default *specJSON `json:"default"`
	} `json:"default"`
	Literal *struct {
		Value string `json:"value"`
	} `json:"literal"`
}

// toHCLDec converts our spec the way Nomad's hclspecutils does (implied names only for
// direct children of an object).
func toHCLDec(t *testing.T, s *specJSON, impliedName string) hcldec.Spec {
	t.Helper()
	switch {
	case s.Object != nil:
		out := hcldec.ObjectSpec{}
		for k, v := range s.Object.Attributes {
			out[k] = toHCLDec(t, v, k)
		}
		return out
	case s.Attr != nil:
		name := s.Attr.Name
		if name == "" {
			name = impliedName
		}
		if name == "" {
			t.Fatalf("Missing name in attribute spec")
		}
		expr, diags := hclsyntax.ParseExpression([]byte(s.Attr.Type), "type", hcl.InitialPos)
		if diags.HasErrors() {
			t.Fatalf("attr %s type %q: %v", name, s.Attr.Type, diags)
		}
		ty, diags := typeexpr.TypeConstraint(expr)
		if diags.HasErrors() {
			t.Fatalf("attr %s type %q: %v", name, s.Attr.Type, diags)
		}
		return &hcldec.AttrSpec{Name: name, Type: ty, Required: s.Attr.Required}
	case s.BlockValue != nil:
		name := s.BlockValue.Name
		if name == "" {
			name = impliedName
		}
		return &hcldec.BlockSpec{TypeName: name, Required: s.BlockValue.Required, Nested: toHCLDec(t, s.BlockValue.Nested, "")}
	case s.Default != nil:
		return &hcldec.DefaultSpec{Primary: toHCLDec(t, s.Default.Primary, ""), Default: toHCLDec(t, s.Default.Default, "")}
	case s.Literal != nil:
		expr, diags := hclsyntax.ParseExpression([]byte(s.Literal.Value), "literal", hcl.InitialPos)
		if diags.HasErrors() {
			t.Fatalf("literal %q is not an HCL expression: %v", s.Literal.Value, diags)
		}
		v, diags := expr.Value(nil)
		if diags.HasErrors() {
			t.Fatalf("literal %q: %v", s.Literal.Value, diags)
		}
		return &hcldec.LiteralSpec{Value: v}
	}
	t.Fatalf("unsupported spec node %+v", s)
	return nil
}

func (h *host) configSpec(t *testing.T) hcldec.Spec {
	t.Helper()
	resp := newMsg(t, basePkg+".ConfigSchemaResponse")
	if err := h.unary(t, "/"+basePkg+".BasePlugin/ConfigSchema", newMsg(t, basePkg+".ConfigSchemaRequest"), resp); err != nil {
		t.Fatalf("ConfigSchema: %v", err)
	}
	spec := field(resp, "spec").Message()
	raw, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(spec.Interface())
	if err != nil {
		t.Fatal(err)
	}
	var s specJSON
	if err := jsonUnmarshal(raw, &s); err != nil {
		t.Fatal(err)
	}
	return toHCLDec(t, &s, "")
}

// encodeConfig runs the agent's pipeline: the HCL1 config as JSON, decoded with the spec,
// then cty msgpack.
func encodeConfig(t *testing.T, spec hcldec.Spec, jsonConfig string) []byte {
	t.Helper()
	file, diags := hcljson.Parse([]byte(jsonConfig), "plugin.json")
	if diags.HasErrors() {
		t.Fatalf("parse config: %v", diags)
	}
	val, diags := hcldec.Decode(file.Body, spec, nil)
	if diags.HasErrors() {
		t.Fatalf("decode config with the plugin's spec: %v", diags)
	}
	b, err := ctymsgpack.Marshal(val, val.Type())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (h *host) setConfig(t *testing.T, msgpack []byte, agent bool) error {
	t.Helper()
	req := newMsg(t, basePkg+".SetConfigRequest")
	req.Set(req.Descriptor().Fields().ByName("msgpack_config"), protoreflect.ValueOfBytes(msgpack))
	req.Set(req.Descriptor().Fields().ByName("plugin_api_version"), protoreflect.ValueOfString("v0.1.0"))
	if agent {
		drv := newMsg(t, basePkg+".NomadDriverConfig")
		drv.Set(drv.Descriptor().Fields().ByName("ClientMaxPort"), protoreflect.ValueOfUint32(14512))
		drv.Set(drv.Descriptor().Fields().ByName("ClientMinPort"), protoreflect.ValueOfUint32(14000))
		nc := newMsg(t, basePkg+".NomadConfig")
		nc.Set(nc.Descriptor().Fields().ByName("driver"), protoreflect.ValueOfMessage(drv))
		req.Set(req.Descriptor().Fields().ByName("nomad_config"), protoreflect.ValueOfMessage(nc))
	}
	return h.unary(t, "/"+basePkg+".BasePlugin/SetConfig", req, newMsg(t, basePkg+".SetConfigResponse"))
}

// kill performs go-plugin's Kill (GRPCController.Shutdown first) and checks the exit was
// graceful, not a SIGKILL after the 2 s grace.
func (h *host) kill(t *testing.T) {
	t.Helper()
	h.client.Kill()
	if !h.client.Exited() {
		t.Fatal("plugin still running after Kill")
	}
	if strings.Contains(h.logs.String(), "plugin failed to exit gracefully") {
		t.Fatalf("plugin ignored GRPCController.Shutdown:\n%s", h.logs.String())
	}
}

func TestFingerprintLaunchPluginInfoAndConfigSchema(t *testing.T) {
	h := launch(t)
	info := h.pluginInfo(t)
	if got := field(info, "type").Enum(); got != 2 {
		t.Errorf("type = %d, want DRIVER (2)", got)
	}
	if got := field(info, "name").String(); got != "elide" {
		t.Errorf("name = %q", got)
	}
	versions := field(info, "plugin_api_versions").List()
	if versions.Len() != 1 || versions.Get(0).String() != "v0.1.0" {
		t.Errorf("plugin_api_versions = %v", versions)
	}
	if field(info, "plugin_version").String() == "" {
		t.Error("empty plugin_version")
	}
	spec := h.configSpec(t)
	// Defaults alone must decode (an agent with `config {}`).
	encodeConfig(t, spec, `{}`)
	h.kill(t)
}

func TestValidationLaunchSetConfigAcceptsHCL1Blocks(t *testing.T) {
	h := launch(t)
	spec := h.configSpec(t)
	cfg := encodeConfig(t, spec, `{
		"daemon_socket": "/run/elide/daemon.sock",
		"fingerprint_period": "10s",
		"session_config": [{"context_pool_size": 3, "enabled_languages": ["py", "js"], "memory_limit_mb": 0.5}],
		"daemon": [{"auto_start": false, "args": ["--verbose"]}]
	}`)
	err := h.setConfig(t, cfg, false)
	if err == nil || !strings.Contains(err.Error(), "session_config.memory_limit_mb: must be a whole number") {
		t.Fatalf("0.5 MiB (sent by cty as float64) must be refused by name, got %v", err)
	}
	cfg = encodeConfig(t, spec, `{
		"daemon_socket": "/run/elide/daemon.sock",
		"session_config": [{"context_pool_size": 300000000000000000000, "enabled_languages": ["py"]}]
	}`)
	err = h.setConfig(t, cfg, false)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "session_config.context_pool_size") {
		t.Fatalf("huge pool size (cty decimal string) must be refused by name, got %v", err)
	}
	cfg = encodeConfig(t, spec, `{
		"session_config": [{"context_pool_size": 3, "enabled_languages": ["py", "js"], "memory_limit_mb": 512}],
		"daemon": [{"auto_start": false, "args": ["--verbose"]}]
	}`)
	if err := h.setConfig(t, cfg, false); err != nil {
		t.Fatalf("SetConfig: %v", err)
	}
	h.kill(t)
}

func TestBadConfigIsInvalidArgumentAndPluginKeepsServing(t *testing.T) {
	h := launch(t)
	spec := h.configSpec(t)
	cases := map[string]string{
		`{"session_config": [{"enabled_languages": ["cobol"]}]}`: `unknown language "cobol"`,
		`{"session_config": [{"context_pool_size": -1}]}`:        "session_config.context_pool_size: must be 0 (no warm workers) or more, got -1",
		`{"daemon_socket": "relative.sock"}`:                     "daemon_socket: must be an absolute path",
	}
	for cfg, want := range cases {
		err := h.setConfig(t, encodeConfig(t, spec, cfg), true)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), want) {
			t.Errorf("config %s: got %v, want InvalidArgument containing %q", cfg, err, want)
		}
	}
	if err := h.setConfig(t, []byte{0x85, 0xa4}, true); status.Code(err) != codes.InvalidArgument {
		t.Errorf("truncated msgpack: got %v", err)
	}
	if field(h.pluginInfo(t), "name").String() != "elide" {
		t.Error("plugin stopped serving")
	}
	h.kill(t)
}

func TestLongLivedInstanceFingerprint(t *testing.T) {
	h := launch(t)
	spec := h.configSpec(t)
	socket := filepath.Join(t.TempDir(), "absent.sock")
	cfg := encodeConfig(t, spec, `{"daemon_socket": "`+socket+`", "fingerprint_period": "1s", "daemon": [{"auto_start": false}]}`)
	if err := h.setConfig(t, cfg, true); err != nil {
		t.Fatalf("SetConfig: %v", err)
	}
	if err := h.unary(t, "/"+driverPkg+".Driver/Init", newMsg(t, driverPkg+".InitRequest"), newMsg(t, driverPkg+".InitResponse")); err != nil {
		t.Fatalf("Init: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := h.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/"+driverPkg+".Driver/Fingerprint")
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.SendMsg(newMsg(t, driverPkg+".FingerprintRequest")); err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		fp := newMsg(t, driverPkg+".FingerprintResponse")
		if err := stream.RecvMsg(fp); err != nil {
			t.Fatalf("fingerprint %d: %v", i, err)
		}
		if got := field(fp, "health").Enum(); got != 1 {
			t.Fatalf("health = %d, want UNHEALTHY (1) without a daemon", got)
		}
		desc := field(fp, "health_description").String()
		if !strings.Contains(desc, "elide-daemon not reachable at "+socket) {
			t.Fatalf("description %q", desc)
		}
		attrs := field(fp, "attributes").Map()
		v := attrs.Get(protoreflect.ValueOfString("driver.elide.version").MapKey())
		if !v.IsValid() {
			t.Fatal("driver.elide.version missing")
		}
	}
	// The task config schema decodes a job config through hcldec too.
	resp := newMsg(t, driverPkg+".TaskConfigSchemaResponse")
	if err := h.unary(t, "/"+driverPkg+".Driver/TaskConfigSchema", newMsg(t, driverPkg+".TaskConfigSchemaRequest"), resp); err != nil {
		t.Fatal(err)
	}
	raw, _ := protojson.MarshalOptions{UseProtoNames: true}.Marshal(field(resp, "spec").Message().Interface())
	var ts specJSON
	if err := jsonUnmarshal(raw, &ts); err != nil {
		t.Fatal(err)
	}
	encodeConfig(t, toHCLDec(t, &ts, ""), `{"code": "print(1)", "language": "py", "args": ["a"], "env": {"K": "v"}, "elide_opts": [{"timeout": "5s"}]}`)
	// A StartTask without a task fails fast with a named error, without hurting the plugin.
	err = h.unary(t, "/"+driverPkg+".Driver/StartTask", newMsg(t, driverPkg+".StartTaskRequest"), newMsg(t, driverPkg+".StartTaskResponse"))
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("StartTask: %v", err)
	}
	h.kill(t)
}

func TestPluginLogsReachTheHostAsStructuredLines(t *testing.T) {
	h := launch(t)
	spec := h.configSpec(t)
	_ = h.setConfig(t, encodeConfig(t, spec, `{"daemon_socket": "relative"}`), false)
	h.kill(t)
	logs := h.logs.String()
	if !strings.Contains(logs, "rejected plugin config") {
		t.Fatalf("plugin log line not forwarded:\n%s", logs)
	}
	for _, line := range strings.Split(logs, "\n") {
		// go-plugin re-logs unparsable stderr lines verbatim: our JSON keys would show up.
		if strings.Contains(line, `\"@level\"`) || strings.Contains(line, `"@level":"warning"`) {
			t.Fatalf("host could not parse a plugin log line: %s", line)
		}
		if strings.Contains(line, "rejected plugin config") && !strings.Contains(line, `"@level":"error"`) {
			t.Fatalf("error line demoted: %s", line)
		}
	}
}
